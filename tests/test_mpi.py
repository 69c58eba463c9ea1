"""Real multi-rank runs under mpiexec (CPU): equivalence with one process, learning, bad input."""

import json
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mpi_util import run_mpi
from reference import reference_train

from jaxpipe.config import load_config

pytestmark = pytest.mark.mpi

# Small enough to run in seconds, deep enough for uneven 4-stage partitions and 2 chunks per rank.
MODEL = ["model.n_layer=8", "model.d_model=64", "model.n_head=4", "model.seq_len=32", "model.vocab_size=128"]
# Adam's eps is raised from 1e-8 so that gradients that are zero in exact arithmetic (the attention
# key bias: softmax ignores a per-row constant) but rounding noise in practice do not become ±lr steps.
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=3", "train.warmup_steps=1",
         "train.decay_steps=10", "train.lr=1e-2", "train.eps=1e-4"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


@cache
def reference():
    return reference_train(load_config(None, MODEL + TRAIN))


INTERLEAVED = ["parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2"]
EMULATED = ["network.delay_ms=2", "network.rate_gbit=5"]
# Layouts that must reproduce the single process, grouped by world size: each group is one mpiexec
# launch (start-up paid once) that trains every layout in turn. Micro-batches per replica M: 4 unless
# the micro-batch size says otherwise (global batch 8).
GROUPS = {
    2: {
        # One process per host with several devices: each stage sharded over 2 (forced) CPU devices.
        "pp2_two_devices_per_rank": ["parallel.pp=2", "parallel.dp=1", "runtime.devices_per_process=2"],
        "pp2_interleaved_v2_m2": ["parallel.pp=2", *INTERLEAVED, "train.micro_batch_size=4"],  # M = PP
        "pp2_interleaved_v2_m4": ["parallel.pp=2", *INTERLEAVED],  # M = 2·PP
        # Link emulation on: gradients move as a ring over the emulated links instead of MPI_Allreduce.
        "pp1xdp2_allreduce_emulated_net": ["parallel.pp=1", "parallel.dp=2", "parallel.dp_mode=allreduce",
                                           *EMULATED],
    },
    3: {"pp3_1f1b_unrolled": ["parallel.pp=3", "parallel.dp=1", "parallel.schedule=1f1b",
                              "model.scan_blocks=false", "parallel.partition=[[0,3],[3,5],[5,8]]"]},
    4: {
        # ...with remat chosen per stage (values must not change).
        "pp4_uneven": ["parallel.pp=4", "parallel.dp=1", "parallel.partition=[2,2,3,1]",
                       "parallel.stage_remat=[block,none,none,dots]"],
        "pp4_interleaved_v2_m4": ["parallel.pp=4", *INTERLEAVED],  # M = PP
        "pp4_interleaved_v2_m8": ["parallel.pp=4", *INTERLEAVED, "train.micro_batch_size=1"],  # M = 2·PP
        "pp4_zb_h1": ["parallel.pp=4", "parallel.schedule=zb_h1", "parallel.partition=even"],
        "pp2xdp2_central_ps": ["parallel.pp=2", "parallel.dp=2", "parallel.dp_mode=central_ps"],
        "pp2xdp2_sharded_ps_1f1b": ["parallel.pp=2", "parallel.dp=2", "parallel.dp_mode=sharded_ps",
                                    "parallel.schedule=1f1b"],
        # ...as a chain reduce + broadcast for the central PS, with the tied embedding exchanged too.
        "pp2xdp2_central_ps_emulated_net": ["parallel.pp=2", "parallel.dp=2", "parallel.dp_mode=central_ps",
                                            *EMULATED, "network.pairs=[[1, 0, 5, 1]]"],
        "pp2xdp2_interleaved_emulated_net": ["parallel.pp=2", "parallel.dp=2", *INTERLEAVED,
                                             "train.micro_batch_size=2", *EMULATED],
        "pp2xdp2_zb_h1_emulated_net": ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=zb_h1",
                                       "parallel.dp_mode=sharded_ps", *EMULATED],
        # The NCCL transport's ready-handshake protocol (with NCCL's blocking transfers played by
        # synchronous MPI sends) under 1F1B, where both directions of every link are busy at once; with
        # one extra warm-up forward per stage, as the GPU runs use it; the tied embedding summed the NCCL
        # transport's way (a device-side allreduce after the emulated link's time, links emulated).
        "pp4_1f1b_handshake_transport": ["parallel.pp=4", "parallel.dp=1", "parallel.schedule=1f1b",
                                         "parallel.extra_warmup=1", "network.delay_ms=1", "network.rate_gbit=10"],
        # ...and under interleaved 1F1B, where the last rank also sends back to the first, with 2 replicas.
        "pp2xdp2_interleaved_handshake_transport": ["parallel.pp=2", "parallel.dp=2", *INTERLEAVED,
                                                    "network.delay_ms=1", "network.rate_gbit=10"],
        # A placement (issue 14) that moves every tied pair and DP group away from the launch order, over a
        # cluster file's per-pair emulated links: placement changes where things run, not what they compute.
        "pp2xdp2_placed_matrix": ["parallel.pp=2", "parallel.dp=2", "parallel.placement=tests/data/placement_2x2.yaml",
                                  "network.matrix=tests/data/cluster4.yaml"],
    },
}
HANDSHAKE = {"pp4_1f1b_handshake_transport", "pp2xdp2_interleaved_handshake_transport"}
ENV = {2: {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}}
_runs: dict[int, Any] = {}


def group_run(n: int, tmp_root: Path):
    """One launch trains every layout of the group (the first test of a group pays for it)."""
    if n not in _runs:
        cases = {name: {"set": MODEL + TRAIN + extra, "handshake": name in HANDSHAKE}
                 for name, extra in GROUPS[n].items()}
        out = tmp_root / f"group{n}"
        out.mkdir()
        run = run_mpi(n, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)],
                      timeout=1200, env=ENV.get(n))
        _runs[n] = (run, out)
    return _runs[n]


@pytest.mark.parametrize(("n", "layout"), [(n, name) for n, group in GROUPS.items() for name in group])
def test_pipeline_equals_single_process(tmp_path_factory, n, layout):
    run, out = group_run(n, tmp_path_factory.getbasetemp())
    assert run.returncode == 0, run.stderr[-20000:]
    ref_losses, ref_norms, ref_params = reference()
    case = out / layout
    result = json.loads((case / "result.json").read_text())
    # Tight: a dropped micro-batch, a mismatched label or summed-not-averaged gradients move these by >1%.
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=2e-6)
    np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=2e-6)
    got: dict[str, np.ndarray] = {}
    tied_copies = []
    for f in sorted(case.glob("rank*.npz")):
        for k, v in np.load(f).items():
            if k == "head/wte":
                tied_copies.append(v)
            elif k in got:  # another DP replica's copy: replicas must hold identical parameters
                np.testing.assert_array_equal(v, got[k], err_msg=f"replicas disagree on {k}")
            else:
                got[k] = v
    assert got.keys() == ref_params.keys()
    for k, ref in ref_params.items():
        np.testing.assert_allclose(got[k], ref, rtol=0, atol=2e-6, err_msg=k)
    for wte in tied_copies:  # the last chunk's copy of the tied embedding stays bit-identical
        np.testing.assert_array_equal(wte, got["embed/wte"])


def test_bfloat16_tied_gradient_exchange(tmp_path):
    """The tied embedding's gradient crosses the wire in bfloat16: both copies of `wte` must still
    be bit-identical, and training must stay close to (but, being rounded, not equal to) float32."""
    run = run_mpi(2, ["tests/mpi_train_dump.py", "--out", str(tmp_path),
                      *sets(MODEL + TRAIN + ["parallel.pp=2", "parallel.tied_grad_dtype=bfloat16"])])
    assert run.returncode == 0, run.stderr
    ref_losses, _, ref_params = reference()
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["losses"][0] == pytest.approx(ref_losses[0], rel=2e-6)  # same parameters at step 1
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-3)
    first, last = (dict(np.load(f)) for f in sorted(tmp_path.glob("rank*.npz")))
    np.testing.assert_array_equal(last["head/wte"], first["embed/wte"])
    diff = np.abs(first["embed/wte"] - ref_params["embed/wte"])
    assert 0 < diff.max() < 1e-3


def test_tiny_job_learns(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    run = run_mpi(4, ["-m", "jaxpipe", "train", "--set", "train.steps=30", "--metrics-out", str(metrics)])
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("jaxpipe 0.1.0: 4 ranks = PP 4 x DP 1 | schedule gpipe")
    assert sum(1 for line in lines if line.startswith("step ")) == 30  # only global rank 0 reports
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 31))
    assert {"step", "loss", "iter_time_s", "tokens_per_s"} <= rows[0].keys()
    first, last = rows[0]["loss"], rows[-1]["loss"]
    assert first == pytest.approx(np.log(512), rel=0.05)  # starts at chance
    assert last < 0.7 * first


BAD_INPUT = {
    "wrong_rank_count": (3, [], "mpiexec started 3 ranks but parallel.pp × parallel.dp = 4 × 1 = 4: launch with -n 4"),
    "partition_gap": (2, ["parallel.pp=2", "parallel.partition=[[0,3],[4,8]]"],
                      "partition has a gap: layers 3..3 belong to no stage (stage 1 starts at 4)"),
    "microbatch_not_dividing": (4, ["train.micro_batch_size=3"],
                                "train.micro_batch_size (3) must divide the per-replica batch"),
    "missing_data_file": (4, ["data.source=tokens", "data.path=/nonexistent/train.bin"],
                          "data.path: no such file '/nonexistent/train.bin'"),
    # Placement files and cluster files (issue 14).
    "placement_repeats": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.placement=tests/data/placement_repeat.yaml"],
                          "parallel.placement tests/data/placement_repeat.yaml: the placement gives stage 0, replica 0 "
                          "to ranks 0 and 2: each (stage, replica) needs exactly one rank"),
    "matrix_wrong_shape": (4, ["network.matrix=tests/data/cluster_bad_shape.yaml"],
                           "network.matrix tests/data/cluster_bad_shape.yaml: bandwidth_gbit[2] has 3 entries, need 4 "
                           "(one per receiving rank)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_fails_on_every_rank(case):
    n, overrides, message = BAD_INPUT[case]
    run = run_mpi(n, ["-m", "jaxpipe", "train", *sets(overrides)], timeout=120)
    assert run.returncode != 0
    assert run.stderr.count("jaxpipe: error: " + message) == n, run.stderr  # once per rank
    assert "step " not in run.stdout  # nothing trained


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("match", "OK [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]"),
        # Messages count steps from 1, as the log does (the message key's step 3 is logged step 4).
        ("wrong_shape", "TransportError: stage 0 (rank 0) sent the activation of micro-batch 1 of step 4 as 24 bytes "
                        "of float32, but stage 1 (rank 1) expects float32[2,4] (32 bytes)"),
        ("wrong_dtype", "TransportError: stage 0 (rank 0) sent the activation of micro-batch 1 of step 4 as 12 bytes "
                        "of bfloat16, but stage 1 (rank 1) expects float32[2,3] (24 bytes)"),
        ("wrong_microbatch", "TransportError: stage 1 (rank 1) expected the activation of micro-batch 1 of step 4 "
                             "from stage 0 (rank 0) but received the activation of micro-batch 2 of step 4"),
        ("bad_magic", "TransportError: corrupt message header from stage 0 (rank 0) to stage 1 (rank 1) while "
                      "waiting for the activation of micro-batch 1 of step 4 (header words [1247301696, 3, 1, 0, "
                      "0, 24, 0, 0], magic 1247301712)"),
        ("wrong_step", "TransportError: stage 1 (rank 1) expected the activation of micro-batch 1 of step 4 from "
                       "stage 0 (rank 0) but received the activation of micro-batch 1 of step 5"),
        ("deadline", "TransportError: receive deadline: stage 1 (rank 1) waited 1 s for the activation of "
                     "micro-batch 1 of step 4 from stage 0 (rank 0): that rank is dead, hung or far slower"),
    ],
)
def test_transport_checks_every_message(mode, expected):
    run = run_mpi(2, ["tests/mpi_transport_check.py", mode], timeout=120)
    out = run.stderr if mode == "deadline" else run.stdout  # The deadline case aborts, printing to stderr.
    assert expected in out, run.stdout + run.stderr


@pytest.mark.mpi
@pytest.mark.parametrize("n", [3, 4])
def test_data_parallel_averages_over_mpi_and_emulated_links(n):
    run = run_mpi(n, ["tests/mpi_grad_sync_check.py"], timeout=180)
    assert run.stdout.strip() == f"all averages right on {n} ranks", run.stdout + run.stderr


# ---- probe-network (issue 14) -----------------------------------------------------------------------------


def test_probe_network_recovers_an_emulated_matrix(tmp_path):
    """Every ordered pair of 4 ranks emulated with its own delay (10-45 ms) and rate (0.1-0.5 Gbit/s),
    asymmetric; probe-network measures them all back within 10%."""
    out = tmp_path / "probed.yaml"
    run = run_mpi(4, ["-m", "jaxpipe", "probe-network", "--out", str(out), "--set",
                      "network.matrix=tests/data/cluster4.yaml"], timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    from jaxpipe.comm.cluster import load_cluster

    want, got = load_cluster("tests/data/cluster4.yaml"), load_cluster(out)
    assert got.n == 4 and len(got.hosts) == 4
    for i in range(4):
        for j in range(4):
            if i != j:
                assert got.delay_ms[i][j] == pytest.approx(want.delay_ms[i][j], rel=0.10), (i, j, "delay")
                assert got.bandwidth_gbit[i][j] == pytest.approx(want.bandwidth_gbit[i][j], rel=0.10), (i, j, "rate")
