"""The schedule IR: each schedule's per-rank orders (written as they print), the lowering, the
checker's verdicts, and every registered schedule's generic properties."""

from contextlib import suppress
from dataclasses import dataclass
from typing import ClassVar

import pytest

from jaxpipe.config import load_config
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.costmodel import StageTime, bubble_fraction, plan
from jaxpipe.pipeline.schedule import (
    Action,
    Explicit,
    ForwardOnly,
    GPipe,
    Interleaved1F1B,
    Lowered,
    OneFOneB,
    Op,
    Schedule,
    ScheduleError,
    ZeroBubbleH1,
    check,
    lower,
    make_schedule,
    parse_actions,
)
from jaxpipe.registry import SCHEDULES


def compute(actions):
    return [a for a in actions if not a.op.is_comm]


def test_gpipe_and_1f1b_orders():
    g = GPipe(3, 4)
    assert g.actions(0) == parse_actions("0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3")
    assert g.actions(2) == parse_actions("2L0 2L1 2L2 2L3")  # the last chunk fuses forward, loss and backward
    s = OneFOneB(3, 4)
    assert s.actions(0) == parse_actions("0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3")
    assert s.actions(1) == parse_actions("1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3")
    s = OneFOneB(3, 5, extra_warmup=1)
    assert s.actions(0) == parse_actions("0F0 0F1 0F2 0F3 0B0 0F4 0B1 0B2 0B3 0B4")
    for sched in (g, s, OneFOneB(4, 2)):
        check(lower(sched))


def test_lowering_adds_the_messages():
    low = lower(GPipe(2, 2))
    assert low.ranks[0] == tuple(parse_actions("0F0 0a0>1 0F1 0a1>1 0g0<1 0B0 0g1<1 0B1"))
    assert low.ranks[1] == tuple(parse_actions("1a0<0 1L0 1g0>0 1a1<0 1L1 1g1>0"))
    assert low.links == {(0, 1)}


@pytest.mark.parametrize("name", SCHEDULES.names())
def test_actions_read_back_from_their_strings(name):
    """`Action.from_str` inverts `str` for every compute and communication action of every
    registered schedule's lowered form (and of evaluation's)."""
    cls = SCHEDULES.get(name)
    sched = cls.build(2, 4, 0, 2 if name == "interleaved_1f1b" else 1)
    for low in (lower(sched), lower(ForwardOnly.like(sched))):
        for actions in low.ranks:
            assert parse_actions(" ".join(map(str, actions))) == list(actions)
    assert Action.from_str("12LI34") == Action(Op.LI, 12, 34)
    assert Action.from_str("3g10<2") == Action(Op.RECV_GRAD, 3, 10, 2)
    with pytest.raises(ValueError, match=r"'0X1' is not an action: write chunk, computation, micro-batch"):
        Action.from_str("0X1")


def _accepted(cls, p, m):
    """Every setting of chunks per rank and extra warm-up that `cls` accepts for P ranks and M micro-batches."""
    out = []
    for v in (1, 2, 3):
        for warm in (0, 1):
            with suppress(ConfigError):
                out.append((cls.build(p, m, warm, v), warm))
    return out


@pytest.mark.parametrize("name", SCHEDULES.names())
@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_every_registered_schedule_is_valid_and_keeps_its_bubble(name, p):
    """For every registered schedule and every setting it accepts: the lowered order passes `check`
    (each micro-batch through each chunk once, messages matched, no deadlock), so does evaluation's
    forward-only order on its chunks; and with equal F, I, W and free links the bubble is the one
    the class states (`ideal_bubble`) wherever M is a multiple of P."""
    cls = SCHEDULES.get(name)
    assert cls.name == name
    runs = 0
    for m in range(1, 3 * p + 1):
        for sched, warm in _accepted(cls, p, m):
            runs += 1
            check(lower(sched))
            check(lower(ForwardOnly.like(sched, round_size=p)))
            v = sched.virtual_stages
            if m % p == 0 and not warm:
                times = [StageTime(1 / v, 2 / v)] * sched.n_chunks
                assert bubble_fraction(sched, times) == pytest.approx(cls.ideal_bubble(p, m, v))
    assert runs >= 2 * p  # the schedule accepted settings for most micro-batch counts


def test_1f1b_activation_memory():
    for p, m, extra in [(4, 16, 1), (4, 3, 2), (2, 8, 5)]:
        sched = OneFOneB(p, m, extra_warmup=extra)
        check(lower(sched))
        for r in range(p - 1):  # at most P - r + extra micro-batches' activations alive at once
            alive = peak = 0
            for a in sched.actions(r):
                alive += 1 if a.op == Op.F else -1
                peak = max(peak, alive)
            assert peak == min(p - r + extra, m)


def test_interleaved_1f1b_megatron_order_and_v_times_messages():
    s = Interleaved1F1B(2, 4, virtual_stages=2)  # chunks 0, 2 on rank 0; 1, 3 on rank 1
    assert s.chunks_of(0) == [0, 2] and s.chunks_of(1) == [1, 3]
    assert s.actions(0) == parse_actions("0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3")
    assert s.actions(1) == parse_actions("1F0 1F1 3L0 3L1 1F2 1B0 1F3 1B1 3L2 3L3 1B2 1B3")
    one = lower(OneFOneB(2, 4))
    inter = lower(s)
    msgs = [sum(a.op.is_comm for a in r) for r in (one.ranks, inter.ranks) for r in [sum(r, ())]]
    assert msgs[1] == 3 * msgs[0]  # 2v - 1 = 3 chunk boundaries instead of 1, back and forth
    assert inter.links == {(0, 1)}  # rank 1 -> rank 0 carries chunk 1 -> 2 too


def test_zb_h1_splits_every_backward_and_defers_w():
    s = ZeroBubbleH1(4, 8)
    for r in range(3):
        ops = [a.op for a in s.actions(r)]
        assert ops.count(Op.I) == ops.count(Op.W) == 8 and Op.B not in ops
        # 1F1B's activation memory: at most 4 - r micro-batches between their F and their I.
        alive = peak = 0
        for a in s.actions(r):
            alive += {Op.F: 1, Op.I: -1}.get(a.op, 0)
            peak = max(peak, alive)
        assert peak == 4 - r
    assert [a.op for a in s.actions(3)].count(Op.LI) == 8
    assert s.actions(0)[:7] == parse_actions("0F0 0F1 0F2 0F3 0I0 0F4 0I1")  # the first W waits for the bubble


def _broken(*ranks, m=2):
    return lower(Explicit.parse(m, ranks))


def test_checker_marks_a_deadlock():
    # Rank 0 runs B1 before F1: caught before the walk.
    with pytest.raises(ScheduleError, match="runs before its F") as e:
        check(_broken("0F0 0B1 0F1 0B0", "1L0 1L1"))
    assert ">>0B1<<" in str(e.value)
    # Rank 1 needs activation 1 first; rank 0 waits for gradient 0 before sending it.
    with pytest.raises(ScheduleError, match="deadlock") as e:
        check(_broken("0F0 0B0 0F1 0B1", "1L1 1L0"))
    text = str(e.value)
    assert ">>0g0<1<<" in text and ">>1a1<0<<" in text and "waits here" in text


def test_checker_marks_w_before_i_and_a_missing_micro_batch():
    with pytest.raises(ScheduleError, match=r"0W0 runs before its I/LI") as e:
        check(_broken("0F0 0W0 0I0 0F1 0B1", "1L0 1L1"))
    assert ">>0W0<<" in str(e.value)
    with pytest.raises(ScheduleError, match="runs nothing for chunk 0, micro-batch 1"):
        check(_broken("0F0 0B0", "1L0"))  # micro-batch 1 is missing


def test_checker_marks_a_send_out_of_order():
    low = lower(GPipe(2, 2))
    r0 = list(low.ranks[0])
    r0[1], r0[0] = r0[0], r0[1]  # the activation's send before the forward that computes it
    bad = Lowered(low.schedule, (tuple(r0), low.ranks[1]), low.links)
    with pytest.raises(ScheduleError, match=r"0a0>1 sends before .* \(a send out of order\)") as e:
        check(bad)
    assert ">>0a0>1<<" in str(e.value)


def test_each_schedule_checks_its_own_settings():
    assert set(SCHEDULES.names()) == {"gpipe", "1f1b", "interleaved_1f1b", "zb_h1"}
    with pytest.raises(ConfigError, match=r"interleaved_1f1b needs at least parallel.pp = 4 micro-batches per "
                                          r"replica, got 3"):
        make_schedule("interleaved_1f1b", 4, 3, virtual_stages=2)
    with pytest.raises(ConfigError, match="interleaved_1f1b needs parallel.virtual_stages >= 2"):
        make_schedule("interleaved_1f1b", 4, 8)
    with pytest.raises(ConfigError, match="parallel.virtual_stages=2 needs a schedule over several chunks"):
        make_schedule("zb_h1", 4, 8, virtual_stages=2)
    with pytest.raises(ConfigError, match=r"parallel.extra_warmup \(1\) applies to parallel.schedule=1f1b only "
                                          r"\(got interleaved_1f1b\)"):
        make_schedule("interleaved_1f1b", 4, 8, 1, 2)
    assert make_schedule("1f1b", 4, 8, 2) == OneFOneB(4, 8, 1, 2)
    # The same rules reach a config through the registry, before anything is built.
    with pytest.raises(ConfigError, match=r"needs at least parallel.pp = 4 micro-batches per replica, got 2"):
        load_config(None, ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
                           "train.micro_batch_size=8"])
    cfg = load_config(None, ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"])
    assert Interleaved1F1B.from_config(cfg) == Interleaved1F1B(4, 8, 2)


@dataclass(frozen=True)
class _LastInFirstOut(Schedule):
    """GPipe with every backward in reverse micro-batch order: a schedule defined outside the library."""

    name: ClassVar[str] = "test_lifo"

    def actions(self, rank):
        m = range(self.n_microbatches)
        (c,) = self.chunks_of(rank)
        if self._last(c):
            return [Action(Op.L, c, i) for i in m]
        return [Action(Op.F, c, i) for i in m] + [Action(Op.B, c, i) for i in reversed(m)]


def test_a_new_schedule_is_one_class():
    """Registering one class is all a new schedule needs: configs name it, its base rules apply,
    and the cost model simulates it."""
    SCHEDULES.register(_LastInFirstOut)
    try:
        cfg = load_config(None, ["parallel.schedule=test_lifo"])
        check(lower(make_schedule("test_lifo", 4, 8)))
        assert plan(cfg).iteration_s > 0
        with pytest.raises(ConfigError, match=r"parallel.extra_warmup \(1\) applies to parallel.schedule=1f1b only "
                                              r"\(got test_lifo\)"):
            load_config(None, ["parallel.schedule=test_lifo", "parallel.extra_warmup=1"])
    finally:
        SCHEDULES._classes.pop("test_lifo")
    with pytest.raises(ConfigError, match=r"parallel.schedule: 'test_lifo' is not one of 'gpipe', '1f1b'"):
        load_config(None, ["parallel.schedule=test_lifo"])
