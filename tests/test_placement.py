"""Placement without MPI: the cluster and placement files, DT-FM's cost model against its published
anchors, the layout simulation against the single-pipeline cost model and hand-computed exchanges,
and the search against brute force."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from tool_loader import load_tool

from jaxpipe.comm.cluster import Cluster, cluster_from_dict, load_cluster, uniform_cluster
from jaxpipe.comm.netem import NetworkEmulator
from jaxpipe.comm.topology import read_placement, write_placement
from jaxpipe.config import NetworkConfig, load_config
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.costmodel import (
    Link,
    StageTime,
    chain_average_ends,
    dp_average_ends,
    dp_sync_s,
    plan,
    predict_layout,
    ring_average_ends,
)
from jaxpipe.pipeline.schedule import make_schedule
from jaxpipe.plan import dtfm
from jaxpipe.plan.cluster import DTFM_CASES, dtfm_scenario, resolve_cluster, two_region_cluster
from jaxpipe.plan.grid import grid_to_layout, launch_grid, layout_to_grid
from jaxpipe.plan.quality import QualityTable, parse_budget
from jaxpipe.plan.search import AlgoChoice, ScheduleChoice, Workload, _links, evaluate, plan_layout

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"


# ---- cluster files ------------------------------------------------------------------------------------


def test_cluster_file_round_trip(tmp_path):
    c = load_cluster(DATA / "cluster4.yaml")
    assert c.n == 4 and c.delay_ms[3][0] == 45 and c.bandwidth_gbit[2][1] == 0.15
    c.save(tmp_path / "again.yaml")
    assert load_cluster(tmp_path / "again.yaml") == c
    # Rank k of a permuted cluster is the old rank order[k]: links move with their ends.
    p = c.permuted([2, 0, 3, 1])
    assert p.delay_ms[0][2] == c.delay_ms[2][3] and p.hosts == ("b", "a", "b", "a")
    assert c.shuffled(7) == c.shuffled(7) != c


def _tree(n=3, **changes):
    tree = {"ranks": n, "delay_ms": [[0, 1, 1], [1, 0, 1], [1, 1, 0]],
            "bandwidth_gbit": [[0, 1, 1], [1, 0, 1], [1, 1, 0]]}
    tree.update(changes)
    return tree


@pytest.mark.parametrize(("changes", "message"), [
    ({"delay_ms": [[0, 1, 1], [1, 0, 1]]},
     "'delay_ms' has 2 rows, but the cluster has 3 ranks: give an 3 x 3 matrix (row = sender, column = receiver)"),
    ({"bandwidth_gbit": [[0, 1, 1], [1, 0], [1, 1, 0]]}, "bandwidth_gbit[1] has 2 entries, need 3"),
    ({"delay_ms": [[0, 1, None], [1, 0, 1], [1, 1, 0]]},
     "delay_ms[0][2] is missing: every ordered pair of ranks needs a delay (rank 0 -> rank 2)"),
    ({"bandwidth_gbit": [[0, 1, 1], [1, 0, 0], [1, 1, 0]]},
     "bandwidth_gbit[1][2] = 0 (rank 1 -> rank 2): a bandwidth must be > 0 Gbit/s"),
    ({"bandwidth_gbit": [[0, 1, 1], [-2, 0, 1], [1, 1, 0]]},
     "bandwidth_gbit[1][0] = -2 (rank 1 -> rank 0): a bandwidth must be > 0 Gbit/s"),
    ({"delay_ms": [[0, 1, 1], [1, 0, -1], [1, 1, 0]]},
     "delay_ms[1][2] = -1 (rank 1 -> rank 2): a delay must be >= 0 ms"),
    ({"speed": [1, 1]}, "'speed' must list one entry per rank (3), got 2"),
    ({"speed": [1, 0, 1]}, "speed[1] = 0: must be a number > 0"),
    ({"latency": 3}, "unknown key 'latency'"),
])
def test_bad_cluster_files_say_what_is_wrong(changes, message):
    with pytest.raises(ConfigError) as e:
        cluster_from_dict(_tree(**changes), "cluster file x.yaml")
    assert str(e.value).startswith("cluster file x.yaml: ")
    assert message in str(e.value)


def test_netem_matrix_gives_every_pair_its_link():
    cfg = NetworkConfig(matrix=str(DATA / "cluster4.yaml"), pairs=[[2, 0, 1, 9]])
    net = NetworkEmulator.from_config(cfg, 2, world=4)
    try:
        assert net.link(1).delay_s == pytest.approx(0.025) and net.link(1).rate_bps == pytest.approx(0.15e9)
        assert net.link(0).rate_bps == pytest.approx(9e9)  # network.pairs overrides the file
        # Two peers do not share a link: each pair is its own (a WAN path).
        assert net.reserve(1, 1000, ready=0.0) == pytest.approx(8000 / 0.15e9 + 0.025)
        assert net.reserve(3, 1000, ready=0.0) == pytest.approx(8000 / 0.5e9 + 0.011)
        assert net.collective_latency(4, [0, 1, 2, 3]) == pytest.approx(2 * 2 * 0.025)
    finally:
        net.close()
    with pytest.raises(ConfigError, match="describes 4 ranks, but the job has 8: use a cluster file of 8 ranks"):
        NetworkEmulator.from_config(cfg, 0, world=8)


# ---- placement files ----------------------------------------------------------------------------------


def test_placement_file_round_trip(tmp_path):
    layout = [(1, 0), (0, 1), (0, 0), (1, 1)]
    write_placement(tmp_path / "p.yaml", layout, 2, 2, settings=["parallel.pp=2"])
    assert read_placement(tmp_path / "p.yaml", 2, 2) == tuple(layout)
    assert read_placement(DATA / "placement_2x2.yaml", 2, 2) == tuple(layout)
    assert layout_to_grid(layout, 2, 2) == [[2, 1], [0, 3]]
    assert grid_to_layout([[2, 1], [0, 3]]) == layout


@pytest.mark.parametrize(("layout", "pp", "dp", "message"), [
    ([[0, 0], [1, 0], [0, 0], [1, 1]], 2, 2,
     "the placement gives stage 0, replica 0 to ranks 0 and 2: each (stage, replica) needs exactly one rank"),
    ([[0, 0], [1, 0], [0, 1]], 2, 2, "the placement lists 3 ranks, but parallel.pp × parallel.dp = 4"),
    ([[0, 0], [1, 0], [0, 1], [2, 1]], 2, 2, "the placement puts rank 3 at stage 2, replica 1: stages are 0..1"),
    ([[0, 0], [1, 0], [0, 1], [1, "x"]], 2, 2, "layout[3] = [1, 'x']: expected [stage, replica] (two integers)"),
])
def test_bad_placements_are_refused(tmp_path, layout, pp, dp, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"pp": pp, "dp": dp, "layout": layout}))
    with pytest.raises(ConfigError) as e:
        read_placement(path, pp, dp)
    assert str(e.value) == f"parallel.placement {path}: {message}" or message in str(e.value)
    assert message in str(e.value)


def test_placement_for_another_shape_is_refused():
    with pytest.raises(ConfigError, match=r"is for PP 2 x DP 2, but parallel.pp x parallel.dp = 4 x 1: set them to "
                                          r"the placement's, or plan again for this shape"):
        read_placement(DATA / "placement_2x2.yaml", 4, 1)


# ---- DT-FM's cost model against the anchors ----------------------------------------------------------

ANCHORS = load_tool("dtfm_original")  # GA, SHUFFLED_LAUNCH: DT-FM's scheduler on its own scenarios


@pytest.mark.parametrize("i", range(5))
def test_dtfm_cost_model_reproduces_the_anchors(i):
    """DT-FM's cost of the listed order is its GA result; of jaxpipe's launch order on the ranks
    shuffled with seed 7, DT-FM's own evaluation of those DP groups (it picks order and matching)."""
    listed = dtfm_scenario(DTFM_CASES[i])
    listed_cost = dtfm.layout_cost(listed, launch_grid(8, 8), dtfm.ANCHOR_SIZES).total
    assert listed_cost == pytest.approx(ANCHORS.GA[i], abs=0.006)
    cost, grid = dtfm.partition_cost(listed.shuffled(7), launch_grid(8, 8), dtfm.ANCHOR_SIZES)
    assert cost.total == pytest.approx(ANCHORS.SHUFFLED_LAUNCH[i], abs=0.006)
    # The layout that evaluation implies costs exactly that when run as is.
    assert dtfm.layout_cost(listed.shuffled(7), grid, dtfm.ANCHOR_SIZES).total == pytest.approx(cost.total)


def test_bottleneck_matching_and_open_path_by_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        cost = rng.integers(0, 30, (5, 5)).astype(float)
        best = min(max(cost[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
        value, cols = dtfm.bottleneck_matching(cost)
        assert value == best and sorted(cols) == list(range(5)) and max(cost[i, cols[i]] for i in range(5)) == best
        dist = rng.random((6, 6))
        length = min(sum(dist[a, b] for a, b in itertools.pairwise(p)) for p in itertools.permutations(range(6)))
        got, path = dtfm.open_path(dist)
        assert got == pytest.approx(length) and sorted(path) == list(range(6))


# ---- jaxpipe's model of a layout ---------------------------------------------------------------------


def test_chain_and_ring_by_hand():
    # Chain of 2, two 1-byte chunks; member 1 ready at 3 s. Up (1 -> 0): 1 s per byte + 0.5 s; down: 2 s + 0.25 s.
    # Member 1 sends at 3 and 4 (arriving 4.5, 5.5); member 0 broadcasts from 5.5: 7.5 + 0.25 and 9.5 + 0.25.
    links = {(1, 0): Link(0.5, 8.0), (0, 1): Link(0.25, 4.0)}
    assert chain_average_ends(2.0, [0.0, 3.0], lambda a, b: links[(a, b)], 2) == pytest.approx([9.75, 9.75])
    # Ring of 3, 1-byte segments: 0 -> 1 at 1 s/byte, 1 -> 2 at 2 s/byte, 2 -> 0 at 1 s/byte + 1 s of delay
    # (worked through step by step in the test's history: each phase 4 s).
    ring = {(0, 1): Link(0.0, 8.0), (1, 2): Link(0.0, 4.0), (2, 0): Link(1.0, 8.0)}
    assert ring_average_ends(3.0, [0.0] * 3, lambda a, b: ring[(a, b)]) == pytest.approx([8.0, 8.0, 8.0])
    # With one link everywhere both are the single-link model's formulas (members dividing the buffer's 2048
    # rows: otherwise the exchange pads them to a multiple of the members, which dp_sync_s counts).
    link = Link(0.1, 8 * 2**20)
    for mode, n in [("central_ps", 2), ("central_ps", 8), ("sharded_ps", 4), ("allreduce", 4)]:
        ends = dp_average_ends(mode, 8 * 2**20, [1.0] * n, lambda a, b: link)
        assert max(ends) - 1.0 == pytest.approx(dp_sync_s(mode, n, 8 * 2**20, link))


def test_layout_prediction_on_a_uniform_cluster_is_the_single_pipeline_model():
    cfg = load_config("configs/gpt3_xl.yaml", ["parallel.dp=2", "parallel.pp=4", "train.global_batch_size=32",
                                               "network.delay_ms=10", "network.rate_gbit=1"])
    # Every pair its own link (a cluster file's links; `network.delay_ms` alone shares a rank's egress).
    ref = plan(cfg, links=lambda a, b: (Link.of(10, 1), True))
    cluster = uniform_cluster(8, 10.0, 1.0)
    work = Workload(cfg, 4, 2, 1, 1, "gpu", 1.0)
    got = evaluate(cluster, work, launch_grid(4, 2), ScheduleChoice("gpipe"), AlgoChoice("central_ps"), "float32",
                   _links(cluster, 0.0), {})
    assert got.iteration_s == pytest.approx(ref.iteration_s, rel=1e-9)
    assert got.prediction.bound == ref.bound


def test_slow_host_slows_only_its_replica():
    sched = make_schedule("gpipe", 2, 4)
    fast, slow = [StageTime(1, 2)] * 2, [StageTime(2, 4)] * 2
    pred = predict_layout(sched, [[0, 2], [1, 3]], [fast, slow], 0.0, lambda a, b: Link())
    assert pred.pipeline_per_replica == pytest.approx([(4 + 1) * 3, (4 + 1) * 6])


# ---- the search --------------------------------------------------------------------------------------

TINY = ["model.n_layer=4", "model.d_model=64", "model.n_head=4", "model.seq_len=128", "model.vocab_size=64",
        "train.global_batch_size=32", "train.micro_batch_size=2", "parallel.schedule=gpipe"]


def _brute(cluster, cfg, pp, dp, settings):
    work = Workload(cfg, pp, dp, cfg.train.micro_batch_size, 1, "cpu", cfg.network.size_scale)
    pair = _links(cluster, 0.0)
    return {p: evaluate(cluster, work, [list(p[s * dp:(s + 1) * dp]) for s in range(pp)], settings.schedule,
                        settings.algo, settings.tied_dtype, pair, {}).iteration_s
            for p in itertools.permutations(range(pp * dp))}


def test_search_finds_the_known_optimum_of_four_ranks_in_two_regions():
    """Ranks alternate between two regions (1 ms and 10 Gbit/s inside, 50 ms and 0.5 Gbit/s across):
    the launch order runs both pipelines across the slow link (16 micro-batches of XL-sized 8 MiB
    activations, 134 ms each, each way: ~2.4 s) and keeps the DP groups inside a region. By hand the
    optimum is the other way round: each pipeline inside one region, the DP average (57 MB per stage
    there and back: ~1.9 s) across. Brute force over all 24 layouts agrees, and the search finds it."""
    cluster = two_region_cluster(4)
    cfg = load_config(None, [*TINY, "parallel.pp=2", "parallel.dp=2", "network.size_scale=128",
                             "train.global_batch_size=64"])
    res = plan_layout(cluster, cfg, search=["placement"], platform="cpu", max_moves=3000)
    brute = _brute(cluster, cfg, 2, 2, res.best.settings)
    assert res.best.iteration_s == pytest.approx(min(brute.values()), rel=1e-9)
    for r in range(2):  # each replica inside one region
        assert cluster.label(res.best.grid[0][r]) == cluster.label(res.best.grid[1][r])
    assert res.launch.iteration_s == pytest.approx(brute[(0, 2, 1, 3)])  # grid [[0, 2], [1, 3]]
    assert res.launch.iteration_s > 1.2 * res.best.iteration_s


def test_search_matches_brute_force():
    cluster = two_region_cluster(4)
    for pp, dp in [(4, 1), (2, 2)]:
        cfg = load_config(None, [*TINY, f"parallel.pp={pp}", f"parallel.dp={dp}", "network.size_scale=128"])
        res = plan_layout(cluster, cfg, search=["placement", "dp_mode", "schedule"], platform="cpu",
                          max_moves=3000)
        assert res.best.iteration_s == pytest.approx(min(_brute(cluster, cfg, pp, dp, res.best.settings).values()),
                                                     rel=1e-9)
        assert res.best.iteration_s < res.launch.iteration_s


QUALITY_ROWS = """
- {parallel.act_codec: int8, parallel.act_grad_codec: int8, loss_increase_pct: 0.2, source: test row}
- {parallel.grad_codec: int8, loss_increase_pct: 0.2, source: test row}
- {parallel.dp_mode: diloco, parallel.dp: 2, parallel.diloco_inner_steps: 30, parallel.diloco_outer_lr: 0.6,
   parallel.diloco_outer_momentum: 0.0, loss_increase_pct: 0.8, source: test row}
"""


def _table(tmp_path):
    (tmp_path / "q.yaml").write_text(QUALITY_ROWS)
    return QualityTable.load(tmp_path / "q.yaml")


def test_search_picks_diloco_across_regions_within_the_budget(tmp_path):
    """Two regions of four ranks, 100 ms and 0.2 Gbit/s across: with a 1 % budget the search runs each
    pipeline inside a region and DiLoCo across (its row: +0.8 %); the run line carries its settings.
    With budget 0 (or none) no lossy choice is offered; a budget below 0 is refused."""
    cluster = two_region_cluster(8, across=(100.0, 0.2))
    cfg = load_config(None, [*TINY, "parallel.pp=4", "parallel.dp=2", "network.size_scale=128"])
    table = _table(tmp_path)
    search = ["placement", "dp_mode", "grad_codec", "act_codec"]
    res = plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=3000, max_loss_increase=1.0,
                      quality=table)
    s = res.best.settings
    assert s.algo.dp_mode == "diloco" and s.algo.inner_steps == 30 and s.algo.loss_pct <= 1.0
    assert "parallel.dp_mode=diloco" in s.overrides() and "parallel.diloco_outer_lr=0.6" in s.overrides()
    for r in range(2):
        assert len({cluster.label(s_row[r]) for s_row in res.best.grid}) == 1  # a pipeline inside one region
    for budget in (0.0, None):
        exact = plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=2000,
                            max_loss_increase=budget, quality=table)
        a = exact.best.settings.algo
        assert (a.dp_mode, a.grad_codec, a.act_codec, a.rows) == (a.dp_mode, "none", "none", ())
        assert a.dp_mode != "diloco"
    with pytest.raises(ConfigError, match="--max-loss-increase must be 0% or more"):
        plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=100, max_loss_increase=-1.0,
                    quality=table)
    with pytest.raises(ConfigError, match="--max-loss-increase must be 0% or more"):
        parse_budget("-1%")
    with pytest.raises(ConfigError, match="plan: the move budget must be at least 1 move, got 0"):
        plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=0)


def test_pinned_keys_are_kept_and_a_missing_row_is_refused(tmp_path):
    """`--set parallel.dp_mode=diloco`: the plan keeps DiLoCo (and its H) even where an exact mode would
    be faster; with a budget, a pinned lossy setting the table has no row for is refused."""
    cluster = two_region_cluster(4)
    cfg = load_config(None, [*TINY, "parallel.pp=2", "parallel.dp=2", "network.size_scale=128",
                             "parallel.dp_mode=diloco", "parallel.diloco_inner_steps=7"])
    search = ["placement", "dp_mode", "grad_codec", "act_codec", "shape"]
    pinned = {"parallel.dp_mode", "parallel.diloco_inner_steps"}
    res = plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=2000, pinned=pinned)
    assert "parallel.dp_mode=diloco" in res.best.settings.overrides()
    assert "parallel.diloco_inner_steps=7" in res.best.settings.overrides()
    with pytest.raises(ConfigError, match=r"has no diloco row with M=\d, H=7"):
        plan_layout(cluster, cfg, search=search, platform="cpu", max_moves=100, pinned=pinned,
                    max_loss_increase=1.0, quality=_table(tmp_path))


def test_faster_hosts_get_more_layers():
    """Hosts of relative speed 1 and 3: `balanced` weighs stages by their DP group's slowest host,
    and the plan puts more layers where the fast host is."""
    base = uniform_cluster(2, 0.1, 100.0)
    cluster = Cluster(base.hosts, base.delay_ms, base.bandwidth_gbit, speed=(1.0, 3.0))
    cfg = load_config(None, ["model.n_layer=8", "parallel.pp=2", "parallel.dp=1"])
    res = plan_layout(cluster, cfg, search=["placement"], max_moves=2000)
    fast_stage = [row[0] for row in res.best.grid].index(1)
    counts = res.best.settings.partition
    assert counts[fast_stage] > counts[1 - fast_stage]
    even = plan_layout(base, cfg, search=["placement"], time_budget_s=0.2)  # the clock's budget (2 layouts: any speed)
    assert res.best.iteration_s < even.best.iteration_s


def test_plan_for_surviving_ranks():
    """Elastic restarts re-plan for a subset of a cluster's ranks: world rank k is ranks[k]."""
    cluster = two_region_cluster(8)
    cfg = load_config(None, [*TINY, "parallel.pp=2", "parallel.dp=2", "network.size_scale=128",
                             "train.global_batch_size=64"])
    survivors = [7, 2, 4, 1]
    res = plan_layout(cluster, cfg, ranks=survivors, search=["placement"], platform="cpu", max_moves=2000)
    again = plan_layout(cluster, cfg, ranks=survivors, search=["placement"], platform="cpu", max_moves=2000)
    # A move budget, no clock: the same search, move for move, on any machine.
    assert (again.best.grid, again.stats["layouts_scored"]) == (res.best.grid, res.stats["layouts_scored"])
    assert res.ranks == survivors and sorted(res.layout) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert res.cluster == cluster.permuted(survivors)  # world rank k of the new job is cluster rank survivors[k]
    for s, row in enumerate(res.best.grid):
        for r, k in enumerate(row):
            assert res.layout[k] == (s, r)
    for r in range(2):  # alternating regions: the survivors 7, 2, 4, 1 are B, A, A, B; each pipeline in one
        assert res.cluster.label(res.best.grid[0][r]) == res.cluster.label(res.best.grid[1][r])


def test_resolve_cluster_names_the_scenarios():
    assert resolve_cluster("dtfm:case4").n == 64
    assert "seed 7" in resolve_cluster("dtfm:case2_two_universities", 7).source
    with pytest.raises(ConfigError, match="no such DT-FM scenario"):
        resolve_cluster("dtfm:case9")


def test_plan_cli_writes_a_placement_training_accepts(tmp_path):
    out = tmp_path / "placement.yaml"
    r = subprocess.run([sys.executable, "-m", "jaxpipe", "plan", "--cluster", str(DATA / "cluster4.yaml"),
                        "--set", "parallel.pp=2", "--set", "parallel.dp=2", "--set", "model.n_layer=4",
                        "--platform", "cpu", "--max-moves", "3000", "--search", "placement,dp_mode",
                        "--placement-out", str(out), "--json"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout)
    assert {"predicted_s", "launch_order_s", "placement", "settings", "bound"} <= got.keys()
    assert got["predicted_s"] <= got["launch_order_s"]
    pp, dp = got["pp"], got["dp"]
    assert [list(x) for x in read_placement(out, pp, dp)] == got["placement"]
