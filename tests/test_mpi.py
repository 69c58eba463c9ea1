"""Real multi-rank runs under mpiexec (CPU): equivalence with one process, learning, bad input."""

import json
import socket
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from mpi_util import MODEL, NESTEROV, TRAIN, WANTED, launch_once, refusals, refused, run_mpi, sets
from reference import reference_diloco, reference_train

from jaxpipe.comm.codec import wire_nbytes
from jaxpipe.comm.message import ArraySpec, Kind
from jaxpipe.config import load_config
from jaxpipe.runtime import hostcheck
from jaxpipe.runtime.launch import Finished

pytestmark = pytest.mark.mpi

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
        # The LM head back on rank 0 (issue 24): the tied sum on one rank, no exchange.
        "pp2_gpipe_ring": ["parallel.pp=2", "parallel.dp=1", "parallel.schedule=gpipe_ring"],
        # The original's timing method: a world barrier starts every step (every other case runs without
        # it and reads its world sums a step late): the same losses either way.
        "pp2_step_barrier": ["parallel.pp=2", "parallel.dp=1", "runtime.step_barrier=true"],
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
        "pp4_gpipe_ring": ["parallel.pp=4", "parallel.dp=1", "parallel.schedule=gpipe_ring"],
        "pp2xdp2_gpipe_ring_sharded_ps": ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=gpipe_ring",
                                          "parallel.dp_mode=sharded_ps"],
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

# ---- data parallelism for slow links (jaxpipe.dp: codecs, DiLoCo, NCCL collectives) ------------------
# Trained in the same launches as GROUPS, checked by their own tests below.
HALVES = ["parallel.pp=2", "parallel.dp=2", "parallel.partition=[[0,4],[4,8]]"]
DILOCO = [*HALVES, *NESTEROV, "parallel.dp_mode=diloco", "parallel.diloco_inner_steps=2", "train.steps=5"]
STREAMING = [*HALVES, *NESTEROV, "parallel.dp_mode=streaming_diloco", "parallel.diloco_inner_steps=4",
             "parallel.diloco_fragments=2", "parallel.diloco_overlap_steps=2", "train.steps=7"]
INT8 = [*HALVES, "parallel.dp_mode=sharded_ps", "parallel.grad_codec=int8"]
# LLaMA blocks (RMSNorm, SwiGLU, rotary positions, grouped-query attention; no wpe) on MODEL's shape.
LLAMA_ARCH = ["model.arch=llama", "model.n_kv_head=2", "model.d_ff=96"]
DP_CASES = {
    4: {
        "pp2xdp2_sharded_ps_int8": INT8,
        "pp2xdp2_sharded_ps_int8_nccl_dp": INT8,  # through the NCCL collectives' CPU stand-in
        "pp2xdp2_diloco_central_nccl_dp": DILOCO,  # reduce + broadcast through the stand-in
        # Stage 0 syncs after steps 2, 4 and 5, stage 1 after 1, 3 and 5; reduce-scatter + all-gather.
        "pp2xdp2_diloco_sharded_stagger_emulated": [*DILOCO, "parallel.diloco_exchange=sharded_ps",
                                                    "parallel.diloco_stagger=true", *EMULATED],
        # Fragment 1 (layers 1, 3, 5, 7) starts after steps 2 and 6, fragment 0 after 4; each merges two steps
        # later (alpha 0.5); after step 7 everything merges and both take a blocking outer step.
        "pp2xdp2_streaming_diloco": STREAMING,
        # DiLoCo with the LM head back on rank 0 (issue 24): both copies of `wte` on one rank, summed there,
        # through the outer steps (the balanced partition: gpipe_ring cuts pp + 1 chunks).
        "pp2xdp2_diloco_gpipe_ring": ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=gpipe_ring",
                                      *NESTEROV, "parallel.dp_mode=diloco", "parallel.diloco_inner_steps=2",
                                      "train.steps=5"],
        # LLaMA with DiLoCo: tied (the head's `wte` copy gets the first stage's step), and untied with Streaming
        # DiLoCo (the head's own `lm_head` in fragment 0 with the embedding and the final norm).
        "pp2xdp2_llama_diloco": [*LLAMA_ARCH, *DILOCO],
        "pp2xdp2_llama_untied_streaming_diloco": [*LLAMA_ARCH, "model.tie_embeddings=false", *STREAMING],
    },
}
NCCL_DP = {"pp2xdp2_sharded_ps_int8_nccl_dp", "pp2xdp2_diloco_central_nccl_dp"}
# Other runs trained in the same launches, each checked by its own test below.
CHECKED_APART = {2: {"pp2_tied_bfloat16": ["parallel.pp=2", "parallel.tied_grad_dtype=bfloat16"],
                    # LLaMA under interleaved 1F1B (2 chunks per rank; the tied pair on chunks 0 and 3).
                    "pp2_llama_interleaved_v2": ["parallel.pp=2", *INTERLEAVED, *LLAMA_ARCH]}}

# ---- fine-tuning an imported LLaMA (issue 25): train.init_from, in the same launches --------------
# (no MODEL keys: the run adopts the checkpoint's model section; an untied head means no tied exchange)
FINETUNE = {
    2: {"pp2_llama_untied_finetune": (False, ["parallel.pp=2", "parallel.dp=1"]),
        "pp2_llama_tied_finetune_1f1b": (True, ["parallel.pp=2", "parallel.dp=1", "parallel.schedule=1f1b"])},
    4: {"pp2xdp2_llama_untied_finetune": (False, ["parallel.pp=2", "parallel.dp=2"])},
}
LLAMA = dict(vocab=128, seq=32, hidden=64, ff=96, layers=4, heads=4, n_kv=2)


def finetune_checkpoint(tmp_path_factory, tied: bool) -> Path:
    """A tiny LLaMA made by transformers and imported by `import-hf`, once per pytest run."""
    def make(out: Path) -> Finished:
        from hf_models import imported_llama

        imported_llama(out, tied, **LLAMA)
        return Finished(0, "", "")

    return launch_once(tmp_path_factory, f"llama_{'tied' if tied else 'untied'}", make)[1] / "ckpt"


def finetune_sets(tmp_path_factory, name: str) -> list[str]:
    for group in FINETUNE.values():
        if name in group:
            tied, extra = group[name]
            return [*TRAIN, *extra, f"train.init_from={finetune_checkpoint(tmp_path_factory, tied)}"]
    raise KeyError(name)


ENV = {2: {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}}


def reads(n: int, *names: str) -> pytest.MarkDecorator:
    """The mark of a test that reads these cases of group `n`'s launch: the launch trains only the cases
    that the tests collected in this pytest run read (tests/conftest.py gathers the marks), so a file or
    test run alone launches no more than it needs."""
    return pytest.mark.reads_cases(f"group{n}", *names)


def group_run(n: int, tmp_path_factory, *names: str):
    """One launch trains every wanted layout of the group (see `reads`), once per pytest run (the first
    test to ask pays; tests/test_survival.py reads group 4's too). `names`: the cases the caller reads."""
    wanted = WANTED.get(f"group{n}", set())
    assert set(names) <= wanted, f"cases {sorted(set(names) - wanted)} of group {n}: mark the test with reads()"
    every = {**GROUPS[n], **DP_CASES.get(n, {}), **CHECKED_APART.get(n, {}), **FINETUNE.get(n, {})}
    assert wanted <= every.keys(), f"no such case of group {n}: {sorted(wanted - every.keys())}"
    cases = {name: {"set": MODEL + TRAIN + extra, "handshake": name in HANDSHAKE, "nccl_dp": name in NCCL_DP}
             for name, extra in {**GROUPS[n], **DP_CASES.get(n, {}), **CHECKED_APART.get(n, {})}.items()
             if name in wanted}
    cases.update({name: {"set": finetune_sets(tmp_path_factory, name)} for name in FINETUNE.get(n, {})
                  if name in wanted})
    return launch_once(tmp_path_factory, f"group{n}", lambda out: run_mpi(
        n, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)], timeout=1200, env=ENV.get(n)))


@pytest.mark.parametrize(("n", "layout"), [pytest.param(n, name, marks=reads(n, name))
                                            for n, group in GROUPS.items() for name in group])
def test_pipeline_equals_single_process(tmp_path_factory, n, layout):
    run, out = group_run(n, tmp_path_factory, layout)
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


@reads(2, "pp2_tied_bfloat16")
def test_bfloat16_tied_gradient_exchange(tmp_path_factory):
    """The tied embedding's gradient crosses the wire in bfloat16: both copies of `wte` must still
    be bit-identical, and training must stay close to (but, being rounded, not equal to) float32."""
    run, out = group_run(2, tmp_path_factory, "pp2_tied_bfloat16")
    assert run.returncode == 0, run.stderr[-20000:]
    case = out / "pp2_tied_bfloat16"
    ref_losses, _, ref_params = reference()
    result = json.loads((case / "result.json").read_text())
    assert result["losses"][0] == pytest.approx(ref_losses[0], rel=2e-6)  # same parameters at step 1
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-3)
    first, last = (dict(np.load(f)) for f in sorted(case.glob("rank*.npz")))
    np.testing.assert_array_equal(last["head/wte"], first["embed/wte"])
    diff = np.abs(first["embed/wte"] - ref_params["embed/wte"])
    assert 0 < diff.max() < 1e-3


@reads(2, "pp2_llama_interleaved_v2")
def test_llama_interleaved_equals_single_process(tmp_path_factory):
    """LLaMA blocks under interleaved 1F1B at PP=2 (2 chunks per rank) equal one process training the same
    LLaMA, step by step; the head's copy of the tied `wte` stays bit-identical."""
    run, out = group_run(2, tmp_path_factory, "pp2_llama_interleaved_v2")
    assert run.returncode == 0, run.stderr[-20000:]
    cfg = load_config(None, MODEL + TRAIN + CHECKED_APART[2]["pp2_llama_interleaved_v2"])
    assert cfg.model.arch == "llama" and cfg.parallel.virtual_stages == 2
    ref_losses, ref_norms, ref_params = reference_train(cfg)
    case = out / "pp2_llama_interleaved_v2"
    result = json.loads((case / "result.json").read_text())
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=2e-6)
    np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=2e-6)
    got, tied_copies = _case_params(case)
    assert tied_copies
    for wte in tied_copies:
        np.testing.assert_array_equal(wte, got["embed/wte"])
    assert got.keys() == ref_params.keys()
    for k, ref in ref_params.items():
        np.testing.assert_allclose(got[k], ref, rtol=0, atol=2e-6, err_msg=k)


def test_tiny_job_learns(tiny_job):
    tmp, run = tiny_job  # the README's default job, 30 steps (tests/conftest.py)
    lines = run.stdout.splitlines()
    assert lines[0].startswith("jaxpipe 0.1.0: 4 ranks = PP 4 x DP 1 | schedule gpipe")
    assert sum(1 for line in lines if line.startswith("step ")) == 30  # only global rank 0 reports
    rows = [json.loads(line) for line in (tmp / "m.jsonl").read_text().splitlines()]
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
    # Refused in set-up, on every rank, not at the first save after a step has compiled and run.
    "unwritable_checkpoint_dir": (2, ["parallel.pp=2", "train.checkpoint_dir=README.md/ckpt",
                                      "train.checkpoint_every=1"],
                                  "train.checkpoint_dir 'README.md/ckpt' cannot be written: Not a directory; choose "
                                  "a directory this job can write on every host"),
    "diloco_without_replicas": (2, ["parallel.pp=2", "parallel.dp_mode=diloco"],
                                "parallel.dp_mode=diloco needs parallel.dp >= 2"),
    # Placement files and cluster files (issue 14).
    "placement_repeats": (4, ["parallel.pp=2", "parallel.dp=2", "parallel.placement=tests/data/placement_repeat.yaml"],
                          "parallel.placement tests/data/placement_repeat.yaml: the placement gives stage 0, replica 0 "
                          "to ranks 0 and 2: each (stage, replica) needs exactly one rank"),
    "matrix_wrong_shape": (4, ["network.matrix=tests/data/cluster_bad_shape.yaml"],
                           "network.matrix tests/data/cluster_bad_shape.yaml: bandwidth_gbit[2] has 3 entries, need 4 "
                           "(one per receiving rank)"),
    # Issue 26: a rank on another platform (rank 1 states "gpu" through the test hook) is refused before compiling.
    "rank_on_other_platform": (2, ["parallel.pp=2"],
                               f"ranks run on different platforms: cpu on rank 0 (host {socket.gethostname()}: "
                               f"rank 0); gpu on rank 1 (host {socket.gethostname()}: rank 1): {hostcheck.FIX}"),
}
BAD_INPUT_ENV = {"rank_on_other_platform": {hostcheck.FAKE_PLATFORM_ENV: "1:gpu"}}


@pytest.mark.parametrize(("n", "layout"), [pytest.param(n, name, marks=reads(n, name))
                                            for n, group in FINETUNE.items() for name in group])
def test_finetuning_equals_single_process(tmp_path_factory, n, layout):
    """Fine-tuning an imported LLaMA (whose forward equals transformers', tests/test_hf_import.py) at PP=2
    and PP=2 × DP=2 equals plain optax AdamW on the whole model from the same weights, step by step."""
    from jaxpipe.train import checkpoint
    from jaxpipe.train.finetune import load_config as load_finetune

    run, out = group_run(n, tmp_path_factory, layout)
    assert run.returncode == 0, run.stderr[-20000:]
    cfg = load_finetune(None, finetune_sets(tmp_path_factory, layout))
    ckpt = Path(cfg.train.init_from)
    init = checkpoint.load_model(ckpt, **{k: getattr(cfg.model, k) for k in ("dtype", "scan_blocks")})[1]
    ref_losses, ref_norms, ref_params = reference_train(cfg, init=init)
    case = out / layout
    result = json.loads((case / "result.json").read_text())
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=2e-6)
    np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=2e-6)
    got, tied_copies = _case_params(case)  # replicas bit-identical
    for wte in tied_copies:
        np.testing.assert_array_equal(wte, got["embed/wte"])
    assert got.keys() == ref_params.keys()
    for k, ref in ref_params.items():
        np.testing.assert_allclose(got[k], ref, rtol=0, atol=2e-6, err_msg=k)
    rows = [json.loads(line) for line in (case / "metrics.jsonl").read_text().splitlines()]
    tied = FINETUNE[n][layout][0]
    assert all((row["tied_bytes"] > 0) == tied for row in rows)  # untied: no tied exchange at all
    assert cfg.model.arch == "llama" and cfg.model.tie_embeddings == tied


INIT_FROM_REFUSED = "init_from_disagreeing_model_key"


@pytest.mark.reads_cases("refusals2", INIT_FROM_REFUSED)
def test_init_from_refuses_disagreeing_model_keys_on_every_rank(tmp_path_factory):
    ckpt = finetune_checkpoint(tmp_path_factory, False)
    run, out = _refusals(tmp_path_factory, 2)
    assert run.returncode == 0, run.stdout + run.stderr  # the launch ran its cases (each refused in-process)
    message = (f"jaxpipe: error: train.init_from={ckpt}: the run adopts the checkpoint's model section, and "
               f"model.n_kv_head=4 (the checkpoint's is 2) disagrees with it: drop it")
    for rank in refused(out, INIT_FROM_REFUSED, 2):
        assert rank["code"] != 0
        assert rank["stderr"].count(message) == 1, rank["stderr"]  # on every rank, before anything compiled
        assert "step " not in rank["stdout"]


def _refusals(tmp_path_factory, n: int):
    """Every bad input of `n` ranks (BAD_INPUT, and the fine-tuning refusal), in one launch."""
    def bad(name: str):
        return lambda _files: {"argv": ["train", *sets(BAD_INPUT[name][1])], "env": BAD_INPUT_ENV.get(name, {})}

    cases = {name: bad(name) for name, (m, _, _) in BAD_INPUT.items() if m == n}
    if n == 2:
        cases[INIT_FROM_REFUSED] = lambda _files: {"argv": ["train", *sets([
            "parallel.pp=2", f"train.init_from={finetune_checkpoint(tmp_path_factory, False)}", "model.n_kv_head=4"])]}
    return refusals(tmp_path_factory, f"refusals{n}", n, cases)


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.reads_cases(f"refusals{BAD_INPUT[c][0]}", c))
                                  for c in BAD_INPUT])
def test_bad_input_fails_on_every_rank(tmp_path_factory, case):
    n, _, message = BAD_INPUT[case]
    run, out = _refusals(tmp_path_factory, n)
    assert run.returncode == 0, run.stdout + run.stderr  # the launch ran its cases (each refused in-process)
    for rank in refused(out, case, n):
        assert rank["code"] != 0
        assert rank["stderr"].count("jaxpipe: error: " + message) == 1, rank["stderr"]  # on every rank
        assert "step " not in rank["stdout"]  # nothing trained


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
        ("wrong_codec", "TransportError: stage 0 (rank 0) sent the activation of micro-batch 1 of step 4 encoded with "
                        "codec int8, but stage 1 (rank 1) decodes activations with float8: every rank must use the "
                        "same parallel.act_codec and parallel.act_grad_codec"),
    ],
)
@pytest.mark.reads_cases("transport_checks")
def test_transport_checks_every_message(tmp_path_factory, mode, expected):
    if mode == "deadline":  # It aborts the job, printing to stderr: a launch of its own.
        run = run_mpi(2, ["tests/mpi_transport_check.py", mode], timeout=120)
        assert expected in run.stderr, run.stdout + run.stderr
        return
    run = _transport_checks(tmp_path_factory)
    assert run.returncode == 0, run.stdout + run.stderr
    outcome = run.stdout.split(f"MODE {mode}\n")[1].split("MODE ")[0]  # what the receiver printed
    assert expected in outcome, run.stdout + run.stderr


def _transport_checks(tmp_path_factory):
    """Every mode but `deadline`, in one launch (each on its own communicator)."""
    modes = ["match", "wrong_shape", "wrong_dtype", "wrong_microbatch", "bad_magic", "wrong_step", "wrong_codec"]
    return launch_once(tmp_path_factory, "transport_checks",
                       lambda _: run_mpi(2, ["tests/mpi_transport_check.py", *modes], timeout=180))[0]


def _rank_params(case: Path) -> list[dict[str, np.ndarray]]:
    return [dict(np.load(f)) for f in sorted(case.glob("rank*.npz"), key=lambda f: int(f.stem[4:]))]


def _replicas_agree(ranks: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """One model from every rank's arrays: replicas bit-identical, the head's `wte` the embedding's."""
    got: dict[str, np.ndarray] = {}
    for arrays in ranks:
        for k, v in arrays.items():
            if k in got:
                np.testing.assert_array_equal(v, got[k], err_msg=f"replicas disagree on {k}")
            elif k != "head/wte":
                got[k] = v
    for arrays in ranks:
        if "head/wte" in arrays:
            np.testing.assert_array_equal(arrays["head/wte"], got["embed/wte"])
    return got


@reads(4, "pp2xdp2_sharded_ps_int8", "pp2xdp2_sharded_ps_int8_nccl_dp")
def test_int8_gradients_with_error_feedback(tmp_path_factory):
    """PP=2 x DP=2, sharded PS, int8 gradients: replicas and both copies of `wte` stay bit-identical
    (each end averages its own part of the tied gradient before the sum), training stays within the
    quantisation's reach of float32, and the NCCL collectives' protocol (CPU stand-in: device arrays
    only, blocking collectives and grouped point-to-point) computes exactly what MPI computes."""
    run, out = group_run(4, tmp_path_factory, "pp2xdp2_sharded_ps_int8", "pp2xdp2_sharded_ps_int8_nccl_dp")
    assert run.returncode == 0, run.stderr[-20000:]
    ref_losses, _, ref_params = reference()
    result = json.loads((out / "pp2xdp2_sharded_ps_int8" / "result.json").read_text())
    assert result["losses"][0] == pytest.approx(ref_losses[0], rel=2e-6)
    np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-3)
    got = _replicas_agree(_rank_params(out / "pp2xdp2_sharded_ps_int8"))
    assert max(float(np.abs(got[k] - v).max()) for k, v in ref_params.items()) > 0  # quantised, not exact
    assert json.loads((out / "pp2xdp2_sharded_ps_int8_nccl_dp" / "result.json").read_text()) == result
    mpi, stand_in = (_rank_params(out / c) for c in ("pp2xdp2_sharded_ps_int8", "pp2xdp2_sharded_ps_int8_nccl_dp"))
    for a, b in zip(mpi, stand_in, strict=True):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# Measured (untied LLaMA, Streaming DiLoCo): losses within 3.0e-7 and parameters within 8.9e-7 of the reference,
# gradient norms within 1.5e-5 after the merges (steps 6 and 7); the bound still fails a wrong rule: Streaming
# DiLoCo's losses differ from blocking DiLoCo's by up to 0.10 after the first merge (BENCHMARKS.md).
DILOCO_NORM_RTOL = {"pp2xdp2_llama_untied_streaming_diloco": 5e-5}


@pytest.mark.parametrize("case", [pytest.param(c, marks=reads(4, c)) for c in [
    "pp2xdp2_diloco_central_nccl_dp", "pp2xdp2_diloco_sharded_stagger_emulated", "pp2xdp2_streaming_diloco",
    "pp2xdp2_diloco_gpipe_ring", "pp2xdp2_llama_diloco", "pp2xdp2_llama_untied_streaming_diloco"]])
def test_diloco_equals_independent_replicas_and_outer_step(tmp_path_factory, case):
    run, out = group_run(4, tmp_path_factory, case)
    assert run.returncode == 0, run.stderr[-20000:]
    cfg = load_config(None, MODEL + TRAIN + DP_CASES[4][case])
    losses, norms, replicas = reference_diloco(cfg, [range(0, 4), range(4, 8)])
    result = json.loads((out / case / "result.json").read_text())
    np.testing.assert_allclose(result["losses"], losses, rtol=1e-5)
    np.testing.assert_allclose(result["grad_norms"], norms, rtol=DILOCO_NORM_RTOL.get(case, 1e-5))
    got = _replicas_agree(_rank_params(out / case))  # after the last step's outer step: one model
    assert got.keys() == replicas[0].keys()
    for k, ref in replicas[0].items():
        np.testing.assert_allclose(got[k], ref, rtol=0, atol=1e-5, err_msg=k)


@pytest.mark.mpi
@pytest.mark.parametrize("n", [2, 3, 4])
def test_data_parallel_averages_over_mpi_and_emulated_links(n):
    run = run_mpi(n, ["tests/mpi_grad_sync_check.py"], timeout=180)
    assert run.stdout.strip() == f"all averages right on {n} ranks", run.stdout + run.stderr


# ---- Compressed pipeline traffic (issue 12): each codec at PP=2 and PP=4 equals a single process
# that applies the same quantisation at the same boundaries (tests/reference_codec.py). ----------------
CODEC_RANGES = {2: [(0, 4), (4, 8)], 4: [(0, 2), (2, 4), (4, 6), (6, 8)]}
CODECS = {  # act_codec, act_grad_codec, tied_grad_dtype
    "bfloat16": ("bfloat16", "bfloat16", "float32"),
    "float8": ("float8", "float8", "bfloat16"),
    "int8": ("int8", "int8", "int8"),
    "int4": ("int4", "int4", "float32"),
    # Stochastic rounding both ways (issue 24): every message's noise from its own key, which the reference
    # derives on its own: at PP=4 (three boundaries' chunk numbers) and at PP=2 x DP=2 (the replica's).
    "int4_sr": ("int4_sr", "int4_sr", "float32"),
}
# (world size, pp, dp) of each codec's cases: every codec at PP=2 and PP=4, int4_sr as above.
CODEC_LAYOUTS = {name: [(2, 2, 1), (4, 4, 1)] for name in CODECS} | {"int4_sr": [(4, 4, 1), (4, 2, 2)]}


def codec_case(pp: int, name: str, dp: int = 1) -> list[str]:
    act, grad, tied = CODECS[name]
    ranges = json.dumps([list(r) for r in CODEC_RANGES[pp]])
    return [f"parallel.pp={pp}", f"parallel.dp={dp}", f"parallel.partition={ranges}", f"parallel.act_codec={act}",
            f"parallel.act_grad_codec={grad}", f"parallel.tied_grad_dtype={tied}"]


def codec_layout(pp: int, dp: int, name: str) -> str:
    return f"pp{pp}{f'xdp{dp}' if dp > 1 else ''}_codec_{name}"


for _name, _layouts in CODEC_LAYOUTS.items():
    for _n, _pp, _dp in _layouts:
        GROUPS[_n][codec_layout(_pp, _dp, _name)] = codec_case(_pp, _name, _dp)
# int8 at PP=4 over the NCCL transport's protocol (uint8 wires through the ready handshake) and its tied
# exchange (the int8 wire all-gathered as bytes, as NcclPairSum.exchange does on GPUs).
HANDSHAKE.add("pp4_codec_int8")
# Not bit-equal: the pipeline's and the reference's values before quantisation differ in their last bits
# (other XLA fusions and reduction orders: a micro-batch's backward against the whole batch's), so now and
# then a value on a rounding boundary lands one quantum apart; Adam (lr 1e-2) turns such a flip in a
# small gradient into a visible parameter change. Measured over these cases (3 steps): losses within
# 1.1e-5, gradient norms within 8e-5, parameters within 7.5e-4 (int8 at PP=4; PP=2 within 1.7e-5). Bounds:
# losses 5e-5, norms 5e-4, parameters per codec below, and always 3x closer to the codec's reference than
# to the uncompressed run's (each codec moves the parameters by 4.6e-4 (bfloat16) to 1.9e-2 (int4)).
CODEC_PARAM_ATOL = {"bfloat16": 2e-4, "float8": 2e-4, "int8": 2e-3, "int4": 2e-3}


def assert_closer_to(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], other: dict[str, np.ndarray],
                     atol: float, what: str) -> None:
    assert got.keys() == ref.keys()
    for k, v in ref.items():
        np.testing.assert_allclose(got[k], v, rtol=0, atol=atol, err_msg=f"{what} {k}")
    near = max(float(np.max(np.abs(got[k] - v))) for k, v in ref.items())
    far = max(float(np.max(np.abs(got[k] - v))) for k, v in other.items())
    assert 3 * near < far, (what, near, far)


@cache
def codec_reference(pp: int, name: str, dp: int = 1):
    from reference_codec import reference_train_codec

    return reference_train_codec(load_config(None, MODEL + TRAIN + codec_case(pp, name, dp)), CODEC_RANGES[pp])


def _case_params(case: Path) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    got: dict[str, np.ndarray] = {}
    tied = []
    for f in sorted(case.glob("rank*.npz")):
        for k, v in np.load(f).items():
            if k == "head/wte":
                tied.append(v)
            elif k in got:
                np.testing.assert_array_equal(v, got[k], err_msg=f"replicas disagree on {k}")
            else:
                got[k] = v
    return got, tied


@pytest.mark.parametrize(("n", "pp", "dp", "name"),
                         [pytest.param(n, pp, dp, name, marks=reads(n, codec_layout(pp, dp, name)))
                          for name, layouts in CODEC_LAYOUTS.items() for n, pp, dp in layouts])
def test_codec_pipeline_equals_reference(tmp_path_factory, n, pp, dp, name):
    run, out = group_run(n, tmp_path_factory, codec_layout(pp, dp, name))
    assert run.returncode == 0, run.stderr[-20000:]
    ref_losses, ref_norms, ref_params = codec_reference(pp, name, dp)
    case = out / codec_layout(pp, dp, name)
    result = json.loads((case / "result.json").read_text())
    got, tied = _case_params(case)
    if name == "int4_sr":
        # Step 1's loss and norm and step 2's loss see only noise drawn before any rounding flip could
        # matter: equal to 2e-7 (the same noise; another noise, nearest rounding's, moves them by 1.6e-3,
        # 6.6e-3 and 7.0e-4). Later, a value on a floor boundary (see above) lands a whole int4 quantum
        # apart and Adam spreads it: measured at PP=4 within 2.0e-4 (losses), 3.1e-3 (norms) and 8.4e-3
        # (parameters, against 2.8e-2 from nearest rounding's reference); at PP=2 x DP=2 within 1.2e-7.
        np.testing.assert_allclose(result["losses"][:2], ref_losses[:2], rtol=2e-6)
        np.testing.assert_allclose(result["grad_norms"][:1], ref_norms[:1], rtol=2e-6)
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-3)
        np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=1e-2)
        for k, v in ref_params.items():
            np.testing.assert_allclose(got[k], v, rtol=0, atol=2e-2, err_msg=k)
    else:
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=5e-5)
        np.testing.assert_allclose(result["grad_norms"], ref_norms, rtol=5e-4)
        assert_closer_to(got, ref_params, reference()[2], CODEC_PARAM_ATOL[name], name)
    for wte in tied:  # both copies of the tied embedding stay bit-identical, whatever its wire
        np.testing.assert_array_equal(wte, got["embed/wte"])
    rows = [json.loads(line) for line in (case / "metrics.jsonl").read_text().splitlines()]
    act, grad, tied_dtype = CODECS[name]
    spec = ArraySpec((2, 32, 64), "float32")
    per_msg = {k: wire_nbytes(c, k, spec) + 64 for k, c in ((Kind.ACT, act), (Kind.GRAD, grad))}
    messages = 4 * (pp - 1)  # per direction: 4 micro-batches (M x replicas) over pp - 1 boundaries
    assert rows[-1]["pipe_bytes"] == messages * (per_msg[Kind.ACT] + per_msg[Kind.GRAD])
    tied_row = {"float32": 4 * 64, "bfloat16": 2 * 64, "int8": 64 + 2}[tied_dtype]
    assert rows[-1]["tied_bytes"] == dp * 2 * 128 * tied_row  # both ends, vocabulary 128 rows


def _delta_data(tmp: Path) -> tuple[Path, Path]:
    """Token files of 21 windows of 32 tokens (global batch 8: an epoch is 2.6 steps, so samples come
    back every few steps, micro-batch (20, 0) straddles the first epoch's end, and no step reads a
    window twice) and a validation file."""
    rng = np.random.default_rng(0)
    train, val = tmp / "train.bin", tmp / "val.bin"
    rng.integers(0, 128, 21 * 32 + 1).astype(np.uint16).tofile(train)
    rng.integers(0, 128, 8 * 32 + 1).astype(np.uint16).tofile(val)
    return train, val


DELTA_RANGES = {"pp4_delta_int4": CODEC_RANGES[4], "pp2xdp2_delta_int4_tied_int8": CODEC_RANGES[2]}


def _delta_cases(tmp: Path) -> dict[str, list[str]]:
    train, val = _delta_data(tmp)
    data = ["data.source=tokens", f"data.path={train}", f"data.val_path={val}", "data.shuffle=false",
            "train.steps=6", "parallel.act_delta=true", "parallel.act_codec=int4"]
    ranges = {k: json.dumps([list(r) for r in v]) for k, v in DELTA_RANGES.items()}
    dp2 = [*data, "parallel.pp=2", "parallel.dp=2", f"parallel.partition={ranges['pp2xdp2_delta_int4_tied_int8']}",
           "parallel.act_grad_codec=float8", "parallel.tied_grad_dtype=int8", "train.eval_every=3",
           "train.eval_batches=1", "train.checkpoint_every=3"]
    return {
        "pp4_delta_int4": [*data, "parallel.pp=4", "parallel.dp=1", f"parallel.partition={ranges['pp4_delta_int4']}",
                           "parallel.act_grad_codec=int8"],
        "pp2xdp2_delta_int4_tied_int8": [*dp2, f"train.checkpoint_dir={tmp / 'ck_straight'}"],
        "pp2xdp2_delta_resumed": [*dp2, f"train.checkpoint_dir={tmp / 'ck_resumed'}"],
    }


def test_delta_mode_equals_reference_and_resumes_exactly(tmp_path):
    """AQ-SGD's delta mode at PP=4 and PP=2 x DP=2 (with the tied embedding in int8 and error feedback)
    equals the single-process model with the same copies; a run resumed after step 3 (copies and
    error-feedback residues restored from the checkpoint) ends bit-identical to the uninterrupted one,
    validation included."""
    sets_ = _delta_cases(tmp_path)
    cases = {name: {"set": MODEL + TRAIN + extra} for name, extra in sets_.items()}
    cases["pp2xdp2_delta_resumed"]["resume"] = str(tmp_path / "ck_straight" / "step_00000003")
    out = tmp_path / "out"
    run = run_mpi(4, ["tests/mpi_train_dump.py", "--out", str(out), "--cases", json.dumps(cases)], timeout=900)
    assert run.returncode == 0, run.stderr[-20000:]
    from reference_codec import reference_train_codec

    for name, ranges in DELTA_RANGES.items():
        ref_losses, ref_norms, ref_params = reference_train_codec(load_config(None, cases[name]["set"]), ranges)
        no_delta = [s for s in cases[name]["set"] if not s.startswith("parallel.act_delta")]
        _, _, plain_params = reference_train_codec(load_config(None, no_delta), ranges)
        result = json.loads((out / name / "result.json").read_text())
        # Step 3 is the first with deltas (they move its loss by 1.5e-4); measured 3.7e-6 there, 0 before.
        np.testing.assert_allclose(result["losses"][:3], ref_losses[:3], rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(result["grad_norms"][:2], ref_norms[:2], rtol=2e-5, err_msg=name)
        # Later steps: rounding flips (see CODEC_PARAM_ATOL) grow through Adam; measured within 2.1e-4.
        np.testing.assert_allclose(result["losses"], ref_losses, rtol=1e-3, err_msg=name)
        got, tied = _case_params(out / name)
        assert_closer_to(got, ref_params, plain_params, 1e-2, name)  # measured 4.1e-3 vs 3.1e-2 without deltas
        for wte in tied:
            np.testing.assert_array_equal(wte, got["embed/wte"])
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        steps = [r["pipe_bytes"] for r in rows if "pipe_bytes" in r]
        # Step 1: every sample new, all int8; deltas later (with DP only for samples back at the same replica).
        assert min(steps) < steps[0] == max(steps)
    straight, resumed = out / "pp2xdp2_delta_int4_tied_int8", out / "pp2xdp2_delta_resumed"
    a = json.loads((straight / "result.json").read_text())
    b = json.loads((resumed / "result.json").read_text())
    assert b["losses"] == a["losses"][3:] and b["grad_norms"] == a["grad_norms"][3:]  # exact
    val = [[r for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
           for d in (straight, resumed)]
    assert val[1] == [r for r in val[0] if r["step"] == 6]
    got_a, _ = _case_params(straight)
    got_b, _ = _case_params(resumed)
    for k, v in got_a.items():
        np.testing.assert_array_equal(got_b[k], v, err_msg=k)


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


@pytest.mark.parametrize("case", [pytest.param(c, marks=reads(4, c)) for c in [
    "pp2xdp2_sharded_ps_int8", "pp2xdp2_diloco_central_nccl_dp", "pp2xdp2_diloco_sharded_stagger_emulated"]])
def test_traffic_description_equals_the_bytes_the_run_reports(tmp_path_factory, case):
    """Each DP algorithm's `traffic` (jaxpipe.comm.traffic), summed over the exchanges its schedule runs and
    over the ranks, is the `dp_bytes` the run reports (the collectives count with the same formula, so this
    checks the description against what the exchange really runs: patterns, codec rows, padding, the
    tied `wte` rows DiLoCo sends on)."""
    from jaxpipe.model.layout import stage_param_counts
    from jaxpipe.registry import DP_ALGORITHMS

    run, out = group_run(4, tmp_path_factory, case)
    assert run.returncode == 0, run.stderr[-20000:]
    cfg = load_config(None, MODEL + TRAIN + DP_CASES[4][case])
    p, m = cfg.parallel, cfg.model
    algo = DP_ALGORITHMS.get(p.dp_mode)
    counts = stage_param_counts(m, [(0, 4), (4, 8)])
    wte = m.vocab_size * m.d_model
    expected = 0
    for stage in range(2):
        n = counts[stage] - (wte if stage == 1 and algo.per_replica_params else 0)  # DiLoCo strips the head's copy
        # Chunk 0's buffer: blocks, wpe, then wte (ravel_pytree's key order).
        wte_at = counts[1] - wte - 2 * m.d_model + m.seq_len * m.d_model
        traffic = algo.traffic(p, n, p.dp, wte if stage == 0 and algo.per_replica_params else 0, wte_at)
        per_exchange = sum(traffic.egress(r) for r in range(p.dp))
        if algo.per_replica_params:  # DiLoCo: after the steps its schedule names (stagger: stage s offset s·H/P)
            offset = stage * p.diloco_inner_steps // 2 if p.diloco_stagger else 0
            n_ex = sum(1 for k in range(1, cfg.train.steps + 1)
                       if (k + offset) % p.diloco_inner_steps == 0 or k == cfg.train.steps)
        else:
            n_ex = cfg.train.steps
        expected += n_ex * per_exchange
    reported = [json.loads(line)["dp_bytes"] for line in (out / case / "metrics.jsonl").read_text().splitlines()
                if '"dp_bytes"' in line]
    assert sum(reported) == expected
