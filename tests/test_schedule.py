"""The schedule IR: each schedule's per-rank orders, the lowering, and the checker's verdicts."""

import pytest

from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.costmodel import StageTime, bubble_fraction
from jaxpipe.pipeline.schedule import (
    SCHEDULES,
    Action,
    Explicit,
    ForwardOnly,
    GPipe,
    Interleaved1F1B,
    Lowered,
    OneFOneB,
    Op,
    ScheduleError,
    ZeroBubbleH1,
    check,
    lower,
    make_schedule,
)


def names(actions):
    return " ".join(str(a) for a in actions if not a.op.is_comm)


def test_gpipe_and_1f1b_orders():
    g = GPipe(3, 4)
    assert names(g.actions(0)) == "0F0 0F1 0F2 0F3 0B0 0B1 0B2 0B3"
    assert names(g.actions(2)) == "2L0 2L1 2L2 2L3"  # the last chunk fuses forward, loss and backward
    s = OneFOneB(3, 4)
    assert names(s.actions(0)) == "0F0 0F1 0F2 0B0 0F3 0B1 0B2 0B3"
    assert names(s.actions(1)) == "1F0 1F1 1B0 1F2 1B1 1F3 1B2 1B3"
    s = OneFOneB(3, 5, extra_warmup=1)
    assert names(s.actions(0)) == "0F0 0F1 0F2 0F3 0B0 0F4 0B1 0B2 0B3 0B4"
    for sched in (g, s, OneFOneB(4, 2)):
        check(lower(sched))


def test_lowering_adds_the_messages():
    low = lower(GPipe(2, 2))
    assert [str(a) for a in low.ranks[0]] == ["0F0", "0a0>1", "0F1", "0a1>1", "0g0<1", "0B0", "0g1<1", "0B1"]
    assert [str(a) for a in low.ranks[1]] == ["1a0<0", "1L0", "1g0>0", "1a1<0", "1L1", "1g1>0"]
    assert low.links == {(0, 1)}


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
    assert names(s.actions(0)) == "0F0 0F1 2F0 2F1 0F2 2B0 0F3 2B1 2F2 0B0 2F3 0B1 2B2 2B3 0B2 0B3"
    assert names(s.actions(1)) == "1F0 1F1 3L0 3L1 1F2 1B0 1F3 1B1 3L2 3L3 1B2 1B3"
    one = lower(OneFOneB(2, 4))
    inter = lower(s)
    msgs = [sum(a.op.is_comm for a in r) for r in (one.ranks, inter.ranks) for r in [sum(r, ())]]
    assert msgs[1] == 3 * msgs[0]  # 2v - 1 = 3 chunk boundaries instead of 1, back and forth
    assert inter.links == {(0, 1)}  # rank 1 -> rank 0 carries chunk 1 -> 2 too


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_every_schedule_is_valid_over_many_shapes(p):
    for m in range(1, 3 * p + 1):
        for sched in (GPipe(p, m), ZeroBubbleH1(p, m), OneFOneB(p, m, extra_warmup=1)):
            check(lower(sched))
            check(lower(ForwardOnly.like(sched)))
    for v in (2, 3):
        for m in range(p, 3 * p + 1):  # any M >= P, also where the last round is shorter than P
            sched = Interleaved1F1B(p, m, virtual_stages=v)
            check(lower(sched))
            check(lower(ForwardOnly.like(sched, round_size=p)))


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
    assert names(s.actions(0)).startswith("0F0 0F1 0F2 0F3 0I0 0F4 0I1")  # the first W waits for the bubble


def test_bubbles_by_hand():
    # Equal F, I, W (backward = I + W = 2 units): 1F1B's bubble (P-1)/M of 3M units, ZB-H1's (P-1)/(3M).
    for p, m in [(4, 8), (4, 16), (8, 32)]:
        times = [StageTime(1, 2)] * p
        assert bubble_fraction(OneFOneB(p, m), times) == pytest.approx((p - 1) / m)
        assert bubble_fraction(ZeroBubbleH1(p, m), times) == pytest.approx((p - 1) / (3 * m))
    # Interleaved over v chunks of half the work each: (P-1)/(v·M) for M a multiple of P.
    times = [StageTime(0.5, 1)] * 8
    assert bubble_fraction(Interleaved1F1B(4, 8, 2), times) == pytest.approx(3 / 16)


def _broken(orders, p=2, m=2, placement="loop"):
    return lower(Explicit(p, m, 1, tuple(tuple(o) for o in orders), placement))


F, B, L, I, W = Op.F, Op.B, Op.L, Op.I, Op.W


def test_checker_marks_a_deadlock():
    # Rank 0 waits for gradient 1 before gradient 0 has any use: the last rank sends 0 first, but rank 0
    # needs activation 1 sent before it can receive... here rank 0 runs B0 before F1, and rank 1's L1 waits.
    orders = [[Action(F, 0, 0), Action(B, 0, 1), Action(F, 0, 1), Action(B, 0, 0)],
              [Action(L, 1, 0), Action(L, 1, 1)]]
    with pytest.raises(ScheduleError, match="runs before its F") as e:
        check(_broken(orders))
    assert ">>0B1<<" in str(e.value)
    orders = [[Action(F, 0, 0), Action(B, 0, 0), Action(F, 0, 1), Action(B, 0, 1)],
              [Action(L, 1, 1), Action(L, 1, 0)]]  # rank 1 needs activation 1 first; rank 0 waits for gradient 0
    with pytest.raises(ScheduleError, match="deadlock") as e:
        check(_broken(orders))
    text = str(e.value)
    assert ">>0g0<1<<" in text and ">>1a1<0<<" in text and "waits here" in text


def test_checker_marks_w_before_i_and_a_missing_micro_batch():
    orders = [[Action(F, 0, 0), Action(W, 0, 0), Action(I, 0, 0), Action(F, 0, 1), Action(B, 0, 1)],
              [Action(L, 1, 0), Action(L, 1, 1)]]
    with pytest.raises(ScheduleError, match=r"0W0 runs before its I/LI") as e:
        check(_broken(orders))
    assert ">>0W0<<" in str(e.value)
    orders = [[Action(F, 0, 0), Action(B, 0, 0)], [Action(L, 1, 0)]]  # micro-batch 1 is missing
    with pytest.raises(ScheduleError, match="runs nothing for chunk 0, micro-batch 1"):
        check(_broken(orders))


def test_checker_marks_a_send_out_of_order():
    low = lower(GPipe(2, 2))
    r0 = list(low.ranks[0])
    r0[1], r0[0] = r0[0], r0[1]  # the activation's send before the forward that computes it
    bad = Lowered(low.schedule, (tuple(r0), low.ranks[1]), low.links)
    with pytest.raises(ScheduleError, match=r"0a0>1 sends before .* \(a send out of order\)") as e:
        check(bad)
    assert ">>0a0>1<<" in str(e.value)


def test_make_schedule_rules():
    assert set(SCHEDULES) == {"gpipe", "gpipe_ring", "1f1b", "interleaved_1f1b", "zb_h1"}
    with pytest.raises(ConfigError, match=r"interleaved_1f1b needs at least parallel.pp = 4 micro-batches per "
                                          r"replica, got 3"):
        make_schedule("interleaved_1f1b", 4, 3, virtual_stages=2)
    with pytest.raises(ConfigError, match="interleaved_1f1b needs parallel.virtual_stages >= 2"):
        make_schedule("interleaved_1f1b", 4, 8)
    with pytest.raises(ConfigError, match="parallel.virtual_stages=2 needs a schedule over several chunks"):
        make_schedule("zb_h1", 4, 8, virtual_stages=2)
