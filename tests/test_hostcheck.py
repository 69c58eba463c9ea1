"""Set-up's device and memory checks (issue 26), as functions of the facts the ranks state: no GPU needed."""

from __future__ import annotations

import dataclasses

import pytest

from jaxpipe.config import load_config
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.memory import ERROR_RANGE, GiB, check_device_memory, check_memory, rank_memory
from jaxpipe.runtime.hostcheck import FIX, RankDevices, check_hosts, describe_hosts, state_devices

H100 = "NVIDIA H100 80GB HBM3"


def rank(r: int, host: str = "gpu1", *, local: int | None = None, listed: str | None = None, host_gpus: int = 1,
         given: str | None = None, platform: str = "gpu", n: int = 1, kind: str = H100,
         jax_platforms: str | None = None) -> RankDevices:
    return RankDevices(r, host, r if local is None else local, tuple(listed.split(",")) if listed else None, host_gpus,
                       tuple(given.split(",")) if given is not None else None, platform, n,
                       kind if platform == "gpu" else "cpu", jax_platforms)


def refusal(ranks: list[RankDevices], k: int = 1) -> str:
    with pytest.raises(ConfigError) as e:
        check_hosts(ranks, k)
    return str(e.value)


# ---- the device check -------------------------------------------------------------------------------------


def test_more_ranks_than_gpus_is_refused_naming_host_ranks_and_gpus():
    # The launch: 2 ranks on a 1-GPU host, no CUDA_VISIBLE_DEVICES; rank 1 got GPU 1 and fell back to CPU.
    ranks = [rank(0, given="0"), rank(1, given="1", platform="cpu")]
    assert refusal(ranks) == ("host gpu1 runs 2 ranks (0, 1) × runtime.devices_per_process=1 = 2 GPUs, but the "
                              f"host has 1 GPU (0): {FIX}")


def test_devices_per_process_counts():
    ranks = [rank(0, host_gpus=3, given="0,1", n=2), rank(1, host_gpus=3, given="2,3", n=1)]
    assert refusal(ranks, k=2) == ("host gpu1 runs 2 ranks (0, 1) × runtime.devices_per_process=2 = 4 GPUs, but "
                                   f"the host has 3 GPUs (0..2): {FIX}")
    check_hosts([rank(0, host_gpus=4, given="0,1", n=2), rank(1, host_gpus=4, given="2,3", n=2)], 2)


def test_cuda_visible_devices_listing_too_few_or_missing_gpus():
    ranks = [rank(0, listed="1", host_gpus=2, given="1"), rank(1, listed="1", host_gpus=2, given="", platform="cpu")]
    assert refusal(ranks) == ("host gpu1 runs 2 ranks (0, 1) × runtime.devices_per_process=1 = 2 GPUs, but "
                              f"CUDA_VISIBLE_DEVICES=1 lists 1 GPU: {FIX}")
    ranks = [rank(0, listed="0,3", host_gpus=2, given="0"), rank(1, listed="0,3", host_gpus=2, given="3",
                                                                 platform="cpu")]
    assert refusal(ranks) == f"host gpu1: CUDA_VISIBLE_DEVICES=0,3 names GPU 3 but the host has 2 GPUs (0..1): {FIX}"


def test_ranks_on_different_platforms_are_refused():
    # Two hosts; the second has no GPU the driver shows, so only the platforms disagree.
    ranks = [rank(0, "a", local=0, given="0"), rank(1, "b", local=0, host_gpus=0, platform="cpu")]
    assert refusal(ranks) == ("ranks run on different platforms: gpu on rank 0 (host a: rank 0); cpu on rank 1 "
                              f"(host b: rank 1): {FIX}")


def test_a_cpu_rank_on_a_gpu_host_needs_jax_platforms_cpu():
    assert refusal([rank(0, given="0", platform="cpu")]) == (
        f"rank 0 on host gpu1 runs on the CPU although the host has 1 GPU (it was given GPU 0): JAX found no GPU "
        f"there; {FIX}; set JAX_PLATFORMS=cpu to run on the CPU on purpose")
    check_hosts([rank(0, given="0", platform="cpu", jax_platforms="cpu"),
                 rank(1, given="1", platform="cpu", jax_platforms="cpu")], 1)  # asked for: more ranks than GPUs is fine


def test_fewer_devices_than_devices_per_process():
    assert refusal([rank(0, host_gpus=0, platform="cpu", n=1)], k=2) == (
        "runtime.devices_per_process=2 but rank 0 on host gpu1 sees 1 cpu device(s): on CPU set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N")


def test_sharing_a_gpu_listed_twice_is_allowed_and_stated():
    ranks = [rank(0, listed="0,0", given="0"), rank(1, listed="0,0", given="0")]
    check_hosts(ranks, 1)
    assert describe_hosts(ranks, 1) == (f"gpu x 1 per rank ({H100}; 1 host; shared on purpose: gpu1: GPU 0 by "
                                        "ranks 0, 1)")


def test_first_line_states_what_every_host_uses():
    two = [rank(0, "a", local=0, given="0"), rank(1, "b", local=0, given="0")]
    assert describe_hosts(two, 1) == f"gpu x 1 per rank ({H100}; 2 hosts)"
    mixed = [two[0], dataclasses.replace(two[1], device_kind="NVIDIA A100-SXM4-80GB")]
    assert describe_hosts(mixed, 1) == (f"1 device(s) per rank (a: rank 0 on gpu {H100}; b: rank 1 on gpu "
                                        "NVIDIA A100-SXM4-80GB)")
    assert describe_hosts([rank(0, host_gpus=0, platform="cpu")], 1) == "cpu x 1 per rank (1 host)"


def test_the_platform_test_hook(monkeypatch):
    monkeypatch.setenv("JAXPIPE_FAKE_PLATFORM", "3:cpu,0:gpu")
    assert state_devices(0, 0, None, 0, None).platform == "gpu"
    assert state_devices(1, 1, None, 0, None).platform == "cpu"  # this test machine's own


# ---- the memory check ---------------------------------------------------------------------------------------

XL = "configs/gpt3_xl.yaml"
H100_LIMIT = int(0.75 * 80e9)  # the allocator's limit on an 80 GB card at JAX's default preallocation (75 %)


def test_xl_gpipe_without_remat_is_refused_and_the_suggested_setting_fits():
    cfg = load_config(XL, ["parallel.pp=2", "parallel.schedule=gpipe", "model.remat=none", "train.global_batch_size=64",
                           "train.micro_batch_size=1"])
    verdict = check_memory(cfg, H100_LIMIT)
    assert verdict.level == "refuse"
    head = ("predicted peak memory does not fit in the device's 55.9 GiB (parallel.schedule=gpipe, model.remat=none, "
            "train.micro_batch_size=1): stage 0 ")
    assert verdict.message.startswith(head), verdict.message
    assert "activations of 64 micro-batches" in verdict.message
    assert "settings predicted to fit: parallel.schedule=1f1b (" in verdict.message
    assert verdict.message.endswith("runtime.memory_check=warn runs it anyway")
    fixed = load_config(XL, ["parallel.pp=2", "parallel.schedule=1f1b", "model.remat=none"])
    assert check_memory(fixed, H100_LIMIT).level == "ok"
    with pytest.raises(ConfigError, match="^predicted peak memory does not fit"):
        check_device_memory(cfg, [[H100_LIMIT], [H100_LIMIT]])
    logged: list[str] = []
    check_device_memory(dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, memory_check="warn")),
                        [[H100_LIMIT], [H100_LIMIT]], logged.append)
    assert logged == ["warning: " + verdict.message]
    check_device_memory(cfg, [[None], [H100_LIMIT]])  # a device without a reported limit: no check


def test_micro_batches_held_follow_the_schedule():
    base = ["parallel.stage_remat=[none,none,none,dots]", "train.micro_batch_size=4"]
    held = [r.held for r in rank_memory(load_config(XL, base), "gpu")]
    assert held == [16, 16, 16, 1]  # GPipe: every micro-batch's residuals; the fused last stage one at a time
    one = [r.held for r in rank_memory(load_config(XL, [*base, "parallel.schedule=1f1b", "parallel.extra_warmup=2"]))]
    assert one == [6, 5, 4, 1]  # 1F1B: P - s + extra_warmup


# BENCHMARKS.md ("GPU: GPT-3 XL on 4 × H200"): per-stage peaks in GiB, PP=4, 1F1B +2, stage_remat
# [none,none,none,dots], batch 64; and the whole model on one H200.
MEASURED = [
    (["train.micro_batch_size=4"], [53.5, 51.7, 42.7, 8.5]),
    (["train.micro_batch_size=4", "parallel.partition=even"], [53.5, 44.5, 37.0, 10.6]),
    (["train.micro_batch_size=2"], [31.4, 30.3, 26.0, 6.6]),
    (["train.micro_batch_size=1"], [20.5, 19.5, 17.5, 5.7]),
    (["train.micro_batch_size=4", "model.scan_blocks=true"], [54.9, 53.1, 44.3, 8.6]),
    (["train.micro_batch_size=2", "model.scan_blocks=true"], [33.1, 32.0, 27.2, 6.9]),
    (["train.micro_batch_size=1", "model.scan_blocks=true"], [22.6, 22.0, 19.7, 6.0]),
]
PIPELINE = ["parallel.schedule=1f1b", "parallel.extra_warmup=2", "parallel.stage_remat=[none,none,none,dots]"]


def test_the_stated_error_range_is_the_models_error_on_the_measured_peaks():
    errors = []
    for sets, measured in MEASURED:
        predicted = [r.peak / GiB for r in rank_memory(load_config(XL, PIPELINE + sets), "gpu")]
        errors += [p / m - 1 for p, m in zip(predicted, measured, strict=True)]
    assert len(errors) == 28
    assert min(errors) == pytest.approx(ERROR_RANGE[0], abs=0.005)
    assert max(errors) == pytest.approx(ERROR_RANGE[1], abs=0.005)
    whole_model = load_config(XL, ["parallel.pp=1", "train.micro_batch_size=4", "model.remat=none"])
    whole = rank_memory(whole_model, "gpu")[0].peak / GiB
    assert whole / 39.8 - 1 == pytest.approx(0.0, abs=0.02)  # the point FUSED_KEPT was fitted to
