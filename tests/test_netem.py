import threading
import time

from jaxpipe.comm.netem import LinkSpec, NetworkEmulator
from jaxpipe.config import NetworkConfig, load_config

MB = 1_000_000


def test_reserve_is_serial_per_link_and_adds_the_delay():
    net = NetworkEmulator(0, LinkSpec(delay_s=0.010, rate_bps=8 * MB))  # 1 MB/s
    try:
        # Three 0.5 MB messages ready at t=100: the link carries one at a time, each arrives 10 ms later.
        due = [net.reserve(1, MB // 2, ready=100.0) for _ in range(3)]
        assert due == [100.5 + 0.010, 101.0 + 0.010, 101.5 + 0.010]
        # A message ready after the link went idle starts at once.
        assert net.reserve(1, MB // 2, ready=200.0) == 200.5 + 0.010
        # Sends to another peer share the rank's egress (one NIC).
        assert net.reserve(2, MB // 2, ready=200.0) == 201.0 + 0.010
    finally:
        net.close()


def test_size_scale_charges_more_bytes_than_are_sent():
    net = NetworkEmulator(0, LinkSpec(0.0, 8 * MB), size_scale=64)
    try:
        assert net.reserve(1, MB // 64, ready=0.0) == 1.0
    finally:
        net.close()


def test_delivery_never_early_and_in_order():
    delay, rate = 0.05, 8 * 10 * MB  # 10 MB/s: 0.5 MB takes 50 ms
    net = NetworkEmulator(0, LinkSpec(delay, rate))
    delivered: list[tuple[int, float]] = []
    lock = threading.Lock()
    try:
        t0 = time.monotonic()
        dues = []
        for i in range(4):
            dues.append(net.send(1, MB // 2, lambda i=i: (lock.acquire(), delivered.append((i, time.monotonic())),
                                                          lock.release())))
        net.drain()
    finally:
        net.close()
    assert [i for i, _ in delivered] == [0, 1, 2, 3]
    for k, (_, at) in enumerate(delivered):
        earliest = t0 + (k + 1) * 0.05 + delay  # link free at t0, one message after another
        assert at >= earliest - 1e-3, (k, at - t0)
        assert at >= dues[k] - 1e-3
    assert delivered[-1][1] - t0 < 2.0  # and not absurdly late


def test_drain_waits_for_its_owners_sends_only():
    """The pipeline's flush drains the transport's sends; a DP exchange scheduled on another thread (Streaming
    DiLoCo) far later must not hold it, and a drain of every owner still waits for both."""
    net = NetworkEmulator(0, LinkSpec(0.0, float("inf")))
    done: list[str] = []
    pipe, dp = object(), object()
    try:
        now = net.clock()
        net.send_at(now + 0.6, lambda: done.append("dp"), owner=dp)
        net.send_at(now + 0.05, lambda: done.append("pipe"), owner=pipe)
        net.drain(owner=pipe)
        waited = net.clock() - now
        assert done == ["pipe"] and waited < 0.5, waited
        net.drain()
        assert done == ["pipe", "dp"] and net.clock() - now >= 0.6 - 1e-3
    finally:
        net.close()


def test_per_pair_link_slows_only_that_pair():
    slow = LinkSpec(delay_s=0.5, rate_bps=8 * MB)
    net = NetworkEmulator(0, LinkSpec(0.001, 8 * 1000 * MB), pairs={(0, 2): slow})
    try:
        to_slow = net.reserve(2, MB, ready=0.0)
        to_fast = net.reserve(1, MB, ready=0.0)  # not queued behind the slow pair's 1 s transfer
        assert to_slow == 1.5
        assert to_fast < 0.01
        assert net.link(2) == slow and net.link(1).rate_bps == 8 * 1000 * MB
    finally:
        net.close()


def test_network_config():
    assert not NetworkConfig().enabled
    cfg = load_config(None, ["network.delay_ms=10", "network.rate_gbit=1", "network.pairs=[[0, 3, 50, 0.5]]"])
    assert cfg.network.enabled
    net = NetworkEmulator.from_config(cfg.network, rank=0)
    try:
        assert net.link(3) == LinkSpec(0.05, 0.5e9) and net.link(1) == LinkSpec(0.01, 1e9)
        assert net.describe().startswith("network emulation on: delay 10 ms, rate 1 Gbit/s, 1 pair override")
    finally:
        net.close()
