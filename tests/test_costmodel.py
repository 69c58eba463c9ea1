import math
from pathlib import Path

import pytest
from tool_loader import load_tool

from jaxpipe.config import load_config
from jaxpipe.pipeline.costmodel import (
    CodecTimes,
    Link,
    StageTime,
    codec_bytes,
    diloco_sync_s,
    dp_sync_s,
    plan,
    predict,
    simulate_pipeline,
    with_codec_times,
)
from jaxpipe.pipeline.schedule import GPipe, OneFOneB


def test_gpipe_two_stages_by_hand():
    # Stage 0: forward 1 s, backward 2 s. Stage 1 (last): fused 3 s. A message takes 0.5 s on the
    # link, then 0.25 s of delay. By hand: act0 arrives 1.75, act1 2.75; stage 1 computes 1.75-4.75
    # (grad0 leaves, arrives 5.5) and 4.75-7.75 (grad1 arrives 8.5); stage 0 runs B0 5.5-7.5 and
    # B1 8.5-10.5.
    link = Link(delay_s=0.25, rate_bps=8.0)  # half a byte at 8 bit/s: 0.5 s
    sim = simulate_pipeline(GPipe(2, 2), [StageTime(1, 2), StageTime(1, 2)], msg_bytes=0.5, links=link)
    assert sim.makespan == pytest.approx(10.5)
    assert sim.stage_end == pytest.approx([10.5, 8.25])
    assert sim.link_busy == pytest.approx([1.0, 1.0])


def test_compute_only_pipeline_is_the_gpipe_formula():
    # Equal stages, free links: (M + P - 1) x (f + b) for any schedule of this shape.
    times = [StageTime(1, 2)] * 3 + [StageTime(1, 2)]
    for sched in (GPipe(4, 8), OneFOneB(4, 8)):
        assert simulate_pipeline(sched, times, 1, Link()).makespan == pytest.approx((8 + 3) * 3)


def test_dp_sync_by_hand():
    link = Link(delay_s=0.1, rate_bps=8 * 2**20)  # 1 MiB/s
    # Chain of 2 replicas, 8 MiB in 2 chunks of 4 MiB: one way = 1 hop x (4 s + 0.1 s) + 1 x 4 s.
    assert dp_sync_s("central_ps", 2, 8 * 2**20, link) == pytest.approx(2 * 8.1)
    # Ring over 4: 2 x 3 steps of (2 MiB / 1 MiB/s + 0.1 s).
    assert dp_sync_s("allreduce", 4, 8 * 2**20, link) == pytest.approx(6 * 2.1)
    assert dp_sync_s("central_ps", 1, 8 * 2**20, link) == 0.0


def test_dp_sync_with_codecs_and_diloco_by_hand():
    link = Link(delay_s=0.1, rate_bps=8 * 2**20)  # 1 MiB/s
    g = 8 * 2**20  # float32 gradients; int8 rows of 1024 + 4 bytes per 4096, int4 516, bfloat16 2048
    w8, w2 = (g * b / 4096 / 2**20 for b in (1028, 2048))  # MiB on the wire
    assert codec_bytes("int8", g) == pytest.approx(w8 * 2**20)
    # Sharded over 4: all-to-all of 3/4 of the rows, all-gather of 3 owners' quarter; one delay each.
    assert dp_sync_s("sharded_ps", 4, g, link, codec="int8") == pytest.approx(2 * (0.75 * w8 + 0.1))
    # Central over 3: gather (each member its rows, one delay), chain broadcast in one chunk (2 hops). The
    # 2048 rows travel padded to a multiple of 3 members (2049), as jaxpipe.dp.exchange sends them.
    w4p = 2049 * 516 / 2**20
    assert dp_sync_s("central_ps", 3, g, link, codec="int4") == pytest.approx(w4p + 0.1 + 2 * (w4p + 0.1))
    # Allreduce over 4: every member's rows to the 3 others.
    assert dp_sync_s("allreduce", 4, g, link, codec="bfloat16") == pytest.approx(3 * w2 + 0.1)
    # Sharded, no codec: ring reduce-scatter (3 steps of a quarter), direct all-gather.
    assert dp_sync_s("sharded_ps", 4, g, link) == pytest.approx(3 * (2 + 0.1) + 6 + 0.1)
    # DiLoCo's outer step on the first stage: the exchange plus the tied `wte`'s step on to the last stage.
    assert diloco_sync_s("sharded_ps", 4, g, link, "int8", wte_bytes=g) == pytest.approx(
        dp_sync_s("sharded_ps", 4, g, link, codec="int8") + w8 + 0.1)


def test_plan_knows_diloco_and_codecs():
    base = ["parallel.pp=2", "model.n_layer=4", "parallel.dp=4", "train.global_batch_size=256",
            "network.delay_ms=10", "network.rate_gbit=1"]
    cfg = load_config("configs/gpt3_xl.yaml", base)
    dense = plan(cfg)
    int8 = plan(load_config("configs/gpt3_xl.yaml", [*base, "parallel.dp_mode=sharded_ps", "parallel.grad_codec=int8"]))
    diloco = plan(load_config("configs/gpt3_xl.yaml", [*base, "parallel.dp_mode=diloco", "parallel.grad_codec=int8",
                                                       "parallel.diloco_inner_steps=50"]))
    assert dense.dp_s > 4 * int8.dp_s > 0
    assert diloco.dp_s == pytest.approx(diloco.dp_outer_s / 50)
    assert diloco.iteration_s < int8.iteration_s < dense.iteration_s


def test_link_bound_named_and_explained():
    pred = predict("gpipe", [StageTime(0.02, 0.04)] * 4, 8 * 2**20, Link.of(10, 1), n_microbatches=64)
    assert pred.bound == "link"
    assert pred.explanation.startswith("link-bound: stage 1's link is busy")
    fast = predict("gpipe", [StageTime(0.02, 0.04)] * 4, 8 * 2**20, Link.of(0.1, 100), n_microbatches=64)
    assert fast.bound == "compute"
    assert fast.iteration_s < pred.iteration_s


def test_predicts_the_originals_tables_from_its_facts():
    original = load_tool("dtfm_original")  # the published tables and the model of those runs
    fp32, fp16 = original.original_model(False, 1), original.original_model(True, 1)
    assert fp32[0].iteration_s == pytest.approx(original.ORIGINAL_PP_FP32[0], rel=1e-3)  # the fitted row
    ratios = [p.iteration_s / r for p, r in zip(fp32 + fp16, original.ORIGINAL_PP_FP32 + original.ORIGINAL_PP_FP16,
                                                strict=True)]
    assert sum(abs(r - 1) <= 0.2 for r in ratios) >= 9  # 9 of 10 rows; fp32 at 50 ms is 21% under
    assert fp16[3].bound == "link"  # GPipe at 10 ms / 1 Gbps
    times = [p.iteration_s for p in fp16]
    assert times == sorted(times)  # slower networks, slower iterations


def test_plan_from_config_counts_messages_and_gradients():
    cfg = load_config("configs/gpt3_xl.yaml", ["network.delay_ms=10", "network.rate_gbit=1"])
    pred = plan(cfg)
    # 64 bf16 messages of 8 MiB each way through a middle stage's egress at 1 Gbit/s: 128 x 67 ms.
    assert pred.components["link"] == pytest.approx(128 * 8 * 2**20 * 8 / 1e9, rel=1e-6)
    assert pred.bound == "link"
    assert math.isfinite(pred.iteration_s) and pred.iteration_s > pred.components["link"]


def test_plan_charges_each_codecs_wire_bytes_per_direction():
    """GPT-3 XL PP=4: int4_row activations (2048 rows of 1,024 + 2 bytes) and int8 gradients (2,048 + 2)
    through a middle stage's egress, 64 of each, at 1 Gbit/s."""
    base = ["network.delay_ms=10", "network.rate_gbit=1"]
    cfg = load_config("configs/gpt3_xl.yaml", [*base, "parallel.act_codec=int4_row", "parallel.act_grad_codec=int8",
                                               "parallel.tied_grad_dtype=int8"])
    pred = plan(cfg, codec_times=CodecTimes())
    assert pred.components["link"] == pytest.approx(64 * 2048 * (1026 + 2050) * 8 / 1e9, rel=1e-9)
    # The tied exchange: 50,257 rows of 2,048 int8 values + a 2-byte scale, after the pipeline.
    assert pred.sync_s == pytest.approx(50257 * 2050 * 8 / 1e9 + 0.01, rel=1e-9)
    assert pred.iteration_s < plan(load_config("configs/gpt3_xl.yaml", base)).iteration_s / 2


def test_codec_time_lands_on_the_chunks_that_do_it():
    times = with_codec_times([StageTime(1, 2)] * 3, CodecTimes(0.1, 0.2, 0.3, 0.4))
    # First chunk: encodes activations, decodes gradients; middle: all four; last: decodes, encodes.
    assert [v for t in times for v in (t.fwd, t.bwd)] == pytest.approx([1.1, 2.4, 1.3, 2.7, 1.2, 2.3])


def test_gradient_messages_may_differ_from_activations():
    link = Link(delay_s=0.0, rate_bps=8.0)  # 1 byte per second
    pred = predict("gpipe", [StageTime(0, 0)] * 2, 1.0, link, n_microbatches=3, grad_msg_bytes=4.0)
    assert pred.components["link"] == pytest.approx(12.0)  # stage 1's egress: 3 gradients of 4 bytes


# ---- issue 24: the tied exchange off the critical path, and the schedule x codec sweep ----------------

XL_INT4 = ["parallel.act_codec=int4_row", "parallel.act_grad_codec=int4_row", "parallel.tied_grad_dtype=int8",
           "network.delay_ms=10", "network.rate_gbit=1"]


def test_gpipe_ring_needs_no_tied_exchange_and_costs_no_link_time():
    """GPT-3 XL at 10 ms / 1 Gbit/s: the LM head on rank 0 removes the 0.87 s tied exchange; its new
    boundary uses the egress each end leaves idle in GPipe (the last rank's in the forward phase, the
    first's in the backward), so the busiest link carries what it did."""
    from jaxpipe.pipeline.costmodel import plan

    before = plan(load_config("configs/gpt3_xl.yaml", XL_INT4))
    after = plan(load_config("configs/gpt3_xl.yaml", [*XL_INT4, "parallel.schedule=gpipe_ring"]))
    assert before.iteration_s == pytest.approx(3.133, abs=2e-3)
    assert after.iteration_s <= 2.4 and after.components["link"] == pytest.approx(before.components["link"])
    assert after.sync_s < 0.05 < 0.8 < before.sync_s


def test_the_tied_bytes_are_stated_once():
    from jaxpipe.comm.tied import wire_bytes_per_end
    from jaxpipe.pipeline.costmodel import tied_bytes_per_end
    from jaxpipe.train.traffic import tied_wire_bytes

    for dtype, per_row in (("float32", 4 * 2048), ("bfloat16", 2 * 2048), ("int8", 2048 + 2)):
        cfg = load_config("configs/gpt3_xl.yaml", [f"parallel.tied_grad_dtype={dtype}"])
        assert wire_bytes_per_end(50257, 2048, dtype) == 50257 * per_row
        assert tied_bytes_per_end(cfg) == tied_wire_bytes(cfg) == 50257 * per_row


def test_sweep_ranks_schedules_and_codecs_within_the_loss_budget():
    from jaxpipe.plan.sweep import best_within, format_sweep, load_quality, sweep

    cfg = load_config("configs/gpt3_xl.yaml", ["parallel.tied_grad_dtype=int8", "network.delay_ms=10",
                                                "network.rate_gbit=1"])
    rows = load_quality()
    choices = sweep(cfg, rows)
    timed = [c.iteration_s for c in (ch.prediction for ch in choices) if c is not None]
    assert timed == sorted(timed) and len(timed) >= 5 * 4
    best = best_within(choices, 1.0)
    assert best is not None and best.loss_increase_pct <= 1.0
    # Nothing faster than the pick is within the budget; a looser budget picks the fastest of all.
    assert all(c.loss_increase_pct > 1.0 for c in choices if c.prediction and c.prediction.iteration_s <
               best.prediction.iteration_s)
    assert best_within(choices, 100.0) is choices[0]
    text = format_sweep(choices, 1.0, "10 ms, 1 Gbit/s")
    assert text.count("**fastest within budget**") == 1 and f"fastest within +1 %: {best.schedule}" in text
    # The delta row needs a token corpus: refused with the config's own message, not silently dropped.
    assert "data.source=synthetic never visits a sample twice" in text


def test_quality_rows_cite_benchmarks_sections_that_exist():
    from jaxpipe.plan.sweep import load_quality

    bench = Path("BENCHMARKS.md").read_text()
    for row in load_quality():
        assert row.source.startswith("BENCHMARKS.md "), row
        assert f"### {row.source.removeprefix('BENCHMARKS.md ')}" in bench, row
