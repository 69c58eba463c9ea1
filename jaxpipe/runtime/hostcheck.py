"""What every rank really runs on, stated by each and checked together before anything compiles.

A rank given a GPU that does not exist does not fail: CUDA finds no device, JAX falls back to the
CPU, and the run dies minutes later, after compiling, at the first message between a bfloat16 GPU
stage and a float32 CPU stage (issue 26). So in set-up every rank states its host, platform and
devices (`RankDevices`, one allgather), and `check_hosts`, a pure function of those facts, refuses
on every rank at once:

- ranks on different platforms (some found their GPU, some did not);
- a host asked for more GPUs (its ranks × `runtime.devices_per_process`) than it has or than
  `CUDA_VISIBLE_DEVICES` lists;
- a rank on a GPU host that runs on the CPU without `JAX_PLATFORMS=cpu` saying so;
- a rank that sees fewer devices than `runtime.devices_per_process`.

Sharing one GPU between ranks stays possible when asked for explicitly: list it once per rank
(`CUDA_VISIBLE_DEVICES=0,0`), which `describe_hosts` then states in the first log line.

Test hook: `JAXPIPE_FAKE_PLATFORM=RANK:PLATFORM[,RANK:PLATFORM...]` makes those world ranks state
that platform (read only here), so a launch on CPU can show the refusal on every rank.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxpipe.errors import ConfigError

FAKE_PLATFORM_ENV = "JAXPIPE_FAKE_PLATFORM"
FIX = ("start fewer ranks per host, set CUDA_VISIBLE_DEVICES to GPUs the host has (list one twice to share it "
       "on purpose: CUDA_VISIBLE_DEVICES=0,0, see docs/gpus.md), or lower runtime.devices_per_process")


@dataclass(frozen=True)
class RankDevices:
    """One rank's statement about where it runs."""

    rank: int  # world rank
    host: str
    local_rank: int  # among the ranks of its host
    listed: tuple[str, ...] | None  # CUDA_VISIBLE_DEVICES as the launcher gave it (None: unset)
    host_gpus: int  # GPUs the host's driver exposes (0: none, or no NVIDIA driver)
    given: tuple[str, ...] | None  # the GPU ids this process was restricted to (None: it set nothing)
    platform: str  # JAX's backend: gpu, cpu, ...
    n_devices: int  # JAX's local devices
    device_kind: str
    jax_platforms: str | None = None  # JAX_PLATFORMS, where set: a CPU run on a GPU host asked for on purpose
    memory_bytes: int | None = None  # the allocator's limit on its first device (GPU), where reported


def host_gpu_count() -> int:
    """GPUs the NVIDIA driver exposes to this host (or container), read without starting CUDA:
    the device files /dev/nvidiaN, else the driver's /proc entries."""
    dev = [p for p in Path("/dev").glob("nvidia*") if re.fullmatch(r"nvidia\d+", p.name)]
    if dev:
        return len(dev)
    proc = Path("/proc/driver/nvidia/gpus")
    return len(list(proc.iterdir())) if proc.is_dir() else 0


def _fake_platform(rank: int) -> str | None:
    spec = os.environ.get(FAKE_PLATFORM_ENV, "")
    for item in filter(None, spec.split(",")):
        r, _, platform = item.partition(":")
        if r.strip() == str(rank):
            return platform.strip()
    return None


def state_devices(rank: int, local_rank: int, listed: str | None, host_gpus: int,
                  given: str | None) -> RankDevices:
    """This rank's statement; starts JAX's backend (after `assign_devices` restricted it)."""
    import jax

    devices = jax.local_devices()
    platform = _fake_platform(rank) or jax.default_backend()
    stats = devices[0].memory_stats() if devices and hasattr(devices[0], "memory_stats") else None
    return RankDevices(rank, socket.gethostname(), local_rank, tuple(listed.split(",")) if listed else None,
                       host_gpus, tuple(given.split(",")) if given else (() if given == "" else None),
                       platform, len(devices), devices[0].device_kind if devices else "none",
                       os.environ.get("JAX_PLATFORMS"), int(stats["bytes_limit"]) if stats and "bytes_limit" in stats
                       else None)


def _ranks(rs: Sequence[int]) -> str:
    return f"rank{'s' * (len(rs) > 1)} {', '.join(map(str, rs))}"


def _gpus(n: int) -> str:
    return f"{n} GPU{'s' * (n != 1)}"


def _by_host(ranks: Sequence[RankDevices]) -> dict[str, list[RankDevices]]:
    hosts: dict[str, list[RankDevices]] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        hosts.setdefault(r.host, []).append(r)
    return hosts


def check_hosts(ranks: Sequence[RankDevices], devices_per_process: int) -> None:
    """Raises ConfigError naming the host, the ranks and the GPUs when the ranks cannot run as
    launched. Pure: every rank calls it on the same gathered facts and raises the same message."""
    k = devices_per_process
    hosts = _by_host(ranks)
    for host, rs in hosts.items():
        if rs[0].host_gpus == 0 or all(r.platform == "cpu" and _cpu_on_purpose(r) for r in rs):
            continue
        need = len(rs) * k
        listed = rs[0].listed
        if listed is not None:
            n = rs[0].host_gpus
            missing = [i for i in dict.fromkeys(listed) if i.isdigit() and int(i) >= n]
            if missing:
                raise ConfigError(
                    f"host {host}: CUDA_VISIBLE_DEVICES={','.join(listed)} names GPU {', '.join(missing)} but the "
                    f"host has {_gpus(rs[0].host_gpus)} ({_ids(rs[0].host_gpus)}): {FIX}")
            have, what = len(listed), f"CUDA_VISIBLE_DEVICES={','.join(listed)} lists {_gpus(len(listed))}"
        else:
            have, what = rs[0].host_gpus, f"the host has {_gpus(rs[0].host_gpus)} ({_ids(rs[0].host_gpus)})"
        if need > have:
            raise ConfigError(
                f"host {host} runs {len(rs)} rank{'s' * (len(rs) > 1)} ({', '.join(str(r.rank) for r in rs)}) × "
                f"runtime.devices_per_process={k} = {_gpus(need)}, but {what}: {FIX}")
    platforms: dict[str, list[RankDevices]] = {}
    for r in sorted(ranks, key=lambda r: r.rank):
        platforms.setdefault(r.platform, []).append(r)
    if len(platforms) > 1:
        parts = "; ".join(f"{p} on {_ranks([r.rank for r in rs])} ({_where(rs)})" for p, rs in platforms.items())
        lost = [r for r in platforms.get("cpu", []) if r.given]
        why = "".join(f"; rank {r.rank} was given GPU {','.join(r.given or ())} on host {r.host} and found none there"
                      for r in lost[:4])
        raise ConfigError(f"ranks run on different platforms: {parts}{why}: {FIX}")
    for r in sorted(ranks, key=lambda r: r.rank):
        if r.platform == "cpu" and r.host_gpus > 0 and not _cpu_on_purpose(r):
            raise ConfigError(
                f"rank {r.rank} on host {r.host} runs on the CPU although the host has {_gpus(r.host_gpus)}"
                + (f" (it was given GPU {','.join(r.given)})" if r.given else "")
                + f": JAX found no GPU there; {FIX}; set JAX_PLATFORMS=cpu to run on the CPU on purpose")
        if r.n_devices < k:
            hint = ("on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N" if r.platform == "cpu"
                    else "check CUDA_VISIBLE_DEVICES")
            raise ConfigError(f"runtime.devices_per_process={k} but rank {r.rank} on host {r.host} sees "
                              f"{r.n_devices} {r.platform} device(s): {hint}")


def _cpu_on_purpose(r: RankDevices) -> bool:
    return r.jax_platforms is not None and r.jax_platforms.split(",")[0].strip() == "cpu"


def _ids(n: int) -> str:
    return "none" if n == 0 else "0" if n == 1 else f"0..{n - 1}"


def _where(rs: Sequence[RankDevices]) -> str:
    return ", ".join(f"host {h}: {_ranks([r.rank for r in group])}" for h, group in _by_host(rs).items())


def describe_hosts(ranks: Sequence[RankDevices], devices_per_process: int) -> str:
    """The first log line's device part: what every host really uses, e.g. `gpu x 1 per rank
    (NVIDIA H100 80GB HBM3; 2 hosts)`, with per-host detail where hosts differ and the shared GPUs."""
    hosts = _by_host(ranks)
    kinds = {(r.platform, r.device_kind) for r in ranks}
    platform = ranks[0].platform
    n_hosts = f"{len(hosts)} host{'s' * (len(hosts) > 1)}"
    shared = [f"{host}: GPU {g} by {_ranks(rs_)}" for host, rs in hosts.items() for g, rs_ in _sharing(rs).items()]
    share = f"; shared on purpose: {'; '.join(shared)}" if shared else ""
    if len(kinds) == 1:
        kind = f"{ranks[0].device_kind}; " if platform != "cpu" else ""
        return f"{platform} x {devices_per_process} per rank ({kind}{n_hosts}{share})"
    detail = "; ".join(f"{host}: {_ranks([r.rank for r in rs])} on "
                       + ", ".join(sorted({f"{r.platform} {r.device_kind}" for r in rs})) for host, rs in hosts.items())
    return f"{devices_per_process} device(s) per rank ({detail}{share})"


def _sharing(rs: Sequence[RankDevices]) -> dict[str, list[int]]:
    users: dict[str, list[int]] = {}
    for r in rs:
        if r.platform == "gpu" and r.given:
            for g in r.given:
                users.setdefault(g, []).append(r.rank)
    return {g: u for g, u in users.items() if len(u) > 1}


def check_devices(comm: Any, devices_per_process: int, placement: Any) -> list[RankDevices]:
    """Every rank's statement, gathered and checked (collective); the facts for the first line."""
    mine = state_devices(comm.Get_rank(), placement.local_rank, placement.listed, placement.host_gpus,
                         placement.visible)
    ranks: list[RankDevices] = comm.allgather(mine)
    check_hosts(ranks, devices_per_process)
    return ranks
