"""The command-line tools that need no MPI job: netem.sh's dry run, `jaxpipe plan`, the model check."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_netem_dry_run_prints_the_originals_commands():
    r = run("bash", "tools/netem.sh", "--dry-run", "apply", "ens3", "10", "1")
    assert r.returncode == 0
    assert r.stdout.strip() == "tc qdisc add dev ens3 root netem delay 10ms rate 1Gbit limit 225000"
    r = run("bash", "tools/netem.sh", "--dry-run", "apply", "ens3", "50", "1")
    assert r.stdout.strip().endswith("delay 50ms rate 1Gbit limit 1125000")
    r = run("bash", "tools/netem.sh", "--dry-run", "clear", "ens3")
    assert r.stdout.strip() == "tc qdisc delete dev ens3 root"


def test_netem_rejects_bad_arguments():
    r = run("bash", "tools/netem.sh", "--dry-run", "apply", "ens3", "1.5", "1")
    assert r.returncode == 2
    assert "DELAY_MS must be a whole number of milliseconds, got '1.5'" in r.stderr
    r = run("bash", "tools/netem.sh", "shape", "ens3")
    assert r.returncode == 2 and "usage:" in r.stderr


def test_plan_names_the_link_bound():
    r = run(sys.executable, "-m", "jaxpipe", "plan", "--config", "configs/gpt3_xl.yaml",
            "--set", "network.delay_ms=10", "--set", "network.rate_gbit=1", "--sweep")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == ("parameters: 1,315,723,264 (1,315.7M); per stage: 409.3M, 352.5M, 352.5M, 304.4M; tied "
                        "embedding: its gradient exchanged between ranks 0 and 3, 411.7 MB each way per step")
    assert lines[1].startswith("predicted iteration ")
    assert lines[2].startswith("link-bound: stage 1's link is busy 8.590 s per iteration")
    assert lines[4] == "| network | iteration s | bound | compute s | pipeline bubble s | link s | synchronisation s |"
    assert lines[4 + 2 + 4].startswith("| 50 ms, 1 Gbps | 12.551 | link | 0.462 |")
    # Then schedule x codec for the configured network, priced from the quality table (issue 24).
    assert lines[4 + 2 + 5].startswith("schedule x pipeline codec at 10 ms, 1 Gbit/s")
    assert lines[-1].startswith("fastest within +1 %: gpipe_ring with ")


def test_model_check_against_the_original():
    r = run(sys.executable, "tools/reproduce_seed.py", "--model-only")
    assert r.returncode == 0, r.stderr
    assert "19 of 20 rows within 20%" in r.stdout


def test_plan_with_codecs_and_measured_codec_times():
    """GPT-3 XL PP=4 at 10 ms / 1 Gbit/s with int4 (a scale per row) both ways and the tied gradient in int8,
    from the 4 x H200 stage times and the H200's measured int4 encode/decode (BENCHMARKS.md)."""
    r = run(sys.executable, "-m", "jaxpipe", "plan", "--config", "configs/gpt3_xl.yaml", "--set", "network.delay_ms=10",
            "--set", "network.rate_gbit=1", "--set", "parallel.act_codec=int4_row",
            "--set", "parallel.act_grad_codec=int4_row",
            "--set", "parallel.tied_grad_dtype=int8", "--stage-ms", "5.1,9.6;6.0,11.3;6.2,11.4;12.1,0",
            "--codec-ms", "0.101,0.102,0.094,0.098")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("parameters: 1,315,723,264 (1,315.7M); per stage: ")
    assert lines[1].startswith("predicted iteration 3.155 s (compute 1.152 s | pipeline bubble 0.033 s | "
                               "link 2.152 s | synchronisation 0.874 s)")
    assert "2.0 MiB per message" in lines[2]


def test_launch_timeout_ends_every_process_of_the_job(tmp_path):
    """The one launch helper (jaxpipe.runtime.launch): past its timeout the whole session goes,
    a child the command started in the background included, and the output so far comes back."""
    import time

    import pytest

    from jaxpipe.runtime.launch import run

    pid_file = tmp_path / "child.pid"
    script = f"sleep 60 & echo $! > {pid_file}; echo started; sleep 60"
    with pytest.raises(subprocess.TimeoutExpired) as e:
        run(["bash", "-c", script], timeout=2)
    assert e.value.output == "started\n"
    stat = Path(f"/proc/{int(pid_file.read_text())}/stat")
    for _ in range(50):  # gone, or a zombie waiting for whoever adopted it
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the background child ({stat}) outlived the job")
    done = run(["bash", "-c", "echo out; echo err >&2; exit 3"], timeout=60)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")


def test_diloco_sweep_simulates_the_reference_diloco():
    """tools/diloco_sweep.py (M replicas vmapped in one process, the (lr, momentum) grid vmapped too) trains
    what tests/reference.py's independent DiLoCo trains: the replicas' mean loss per step agrees for every
    setting of the grid, and the exact-DP baseline is the single-process run."""
    import argparse

    import numpy as np
    from reference import reference_diloco, reference_train
    from tool_loader import load_tool

    from jaxpipe.config import load_config

    sweep = load_tool("diloco_sweep")
    small = ["model.n_layer=2", "model.d_model=32", "model.n_head=2", "model.seq_len=16", "model.vocab_size=64",
             "train.global_batch_size=8", "train.micro_batch_size=2", "train.warmup_steps=1", "train.lr=1e-2"]
    args = argparse.Namespace(config=None, set=small, steps=7, val_samples=16, eval_every=3)
    ctx = sweep._setup(args)
    exact, _ = sweep.run_exact(args, ctx, set())
    rows = sweep.run_diloco(args, ctx, 2, 3, [0.4, 1.0], [0.0, 0.9], None, 0, exact)
    base = [*small, "train.steps=7", "train.decay_steps=7", "parallel.pp=1"]
    ref_exact, _, _ = reference_train(load_config(None, [*base, "parallel.dp=1"]))
    assert abs(exact["train_last100"] - float(np.mean(ref_exact))) < 1e-5
    for row in rows:
        cfg = load_config(None, [*base, "parallel.dp=2", "parallel.dp_mode=diloco", "parallel.diloco_inner_steps=3",
                                 f"parallel.diloco_outer_lr={row['outer_lr']}",
                                 f"parallel.diloco_outer_momentum={row['outer_momentum']}"])
        losses, _, _ = reference_diloco(cfg, [range(0, 2)])
        np.testing.assert_allclose(row["train_losses"], losses, rtol=2e-5, err_msg=str(row["outer_lr"]))


def test_cities_bench_window_holds_whole_rounds_and_xl_bytes():
    """tools/placement_bench.py times DiLoCo over a window after two rounds of outer steps (compilation) that
    holds exactly `rounds` outer steps of every fragment and ends before the run's last (extra) step; its
    size_scale charges a stage's DP bytes as GPT-3 XL's."""
    import dataclasses

    import pytest
    from tool_loader import load_tool

    from jaxpipe.config import load_config
    from jaxpipe.plan.search import config_algo

    bench = load_tool("placement_bench")
    text = REPO / "configs" / "tiny_text.yaml"
    cfg = load_config(text, [*bench.CITIES_DEFAULTS, "parallel.pp=4", "parallel.dp=2",
                                                  *bench.EXPOSED_DEFAULTS, "parallel.dp_mode=streaming_diloco"])
    algo = config_algo(cfg)
    H, F, tau = algo.inner_steps, algo.fragments, algo.overlap_steps
    for rounds in (1, 2):
        lo, hi, steps = bench._window(algo, None, rounds, 0)
        assert lo >= 2 * H + tau and steps == hi + 1
        window = range(lo + 1, hi + 1)  # 1-based steps
        for f in range(F):
            starts = [k for k in window if (k + f * H // F) % H == 0]
            assert len(starts) == rounds, (f, starts)
    assert bench._window(dataclasses.replace(algo, dp_mode="central_ps"), None, 2, 6) == (2, 8, 9)
    scale = bench.xl_scale(cfg)
    assert bench.stands_for(load_config(text, [
        *bench.CITIES_DEFAULTS, f"network.size_scale={scale}"]))["dp_bytes_vs_xl"] == pytest.approx(1.0, abs=1e-3)
