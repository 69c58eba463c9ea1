"""Each pipeline rank's peak device memory in a training step, predicted before compiling, and the
check of that prediction against the device's memory (issue 26).

A rank's peak is, in bytes:

- its parameters' state, `STATE_BYTES_PER_PARAM` per parameter: float32 parameters, the float32
  gradient buffer the backward programs accumulate into (`jaxpipe.pipeline.stage`), AdamW's two
  float32 moments;
- the residuals of the micro-batches whose forward has run and whose backward has not, at the worst
  point of the rank's schedule (GPipe holds all M of them, 1F1B at most P - s + extra_warmup; the
  fused last chunk `L` holds one, inside its program, plus its float32 logits and their gradient;
  there XLA keeps only a share of the traced residuals without remat, `FUSED_KEPT`);
- the receive buffers posted ahead (`parallel.recv_lookahead` messages per direction).

A micro-batch's residuals are not estimated from a formula but read off the program: the chunk's
forward (`StageProgram._forward`, what `jax.vjp` keeps) is traced abstractly (`jax.make_jaxpr`, no
device memory, a fraction of a second per trace) for one layer of the stage's own remat policy,
dtype and micro-batch size, and scaled by the chunk's layers; residuals that are the parameters
themselves are forwarded by `jit`, not copied, and are not counted. cuDNN's flash attention cannot be
traced without cuDNN, so the trace stands in for it with a function keeping exactly what cuDNN's
backward keeps (q, k, v, the output and float32 softmax statistics per row).

Against the per-stage peaks measured on H200 (BENCHMARKS.md, "Memory model against measured peaks")
the prediction's error is `ERROR_RANGE`; `check_memory` uses it: a stage predicted above the device's
limit by more than the largest over-prediction is refused (it would not fit even if the model erred
as far as it ever did), one predicted within that band is warned about.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

from jaxpipe.config import Config, ModelConfig
from jaxpipe.errors import ConfigError
from jaxpipe.pipeline.partition import StageSpec, config_partition
from jaxpipe.pipeline.schedule import Op, config_schedule

STATE_BYTES_PER_PARAM = 16  # float32 parameter + float32 gradient buffer + AdamW mu and nu
# Inside the fused last-chunk program (L) the residuals are not program outputs, and XLA keeps fewer
# of them without remat (element-wise results recomputed inside fusions): the share of the traced
# residuals it keeps, fitted to the one such peak measured (whole GPT-3 XL on one H200, mb 4: 39.8 GiB).
FUSED_KEPT = {"none": 0.51}
# predicted / measured - 1 over the measured per-stage peaks (BENCHMARKS.md): the model's error.
ERROR_RANGE = (-0.13, 0.09)
GiB = 2**30


@dataclass(frozen=True)
class ChunkBytes:
    """One chunk's numbers from the traces."""

    params: int  # parameter count
    residual: int  # bytes one micro-batch's forward keeps for its backward
    logits: int  # the last chunk's float32 logits of one micro-batch (0 elsewhere)


@dataclass(frozen=True)
class RankMemory:
    rank: int
    state: int  # parameters, gradient buffer, optimizer moments
    activations: int  # residuals (and the last chunk's logits) at the schedule's worst point
    messages: int  # receive buffers posted ahead
    held: int  # micro-batches' residuals alive at that point

    @property
    def peak(self) -> int:
        return self.state + self.activations + self.messages


def _model_for(cfg: ModelConfig, platform: str) -> tuple[ModelConfig, bool]:
    """The model as the platform runs it (dtype, attention), and whether attention is cuDNN's."""
    dtype = cfg.dtype if cfg.dtype != "auto" else ("bfloat16" if platform == "gpu" else "float32")
    half = dtype in ("bfloat16", "float16")
    cudnn = cfg.attention == "cudnn" or (cfg.attention == "auto" and half and platform == "gpu")
    return dataclasses.replace(cfg, dtype=dtype, attention="xla"), cudnn


@contextlib.contextmanager
def _flash_stand_in() -> Iterator[None]:
    """Attention that keeps for its backward what cuDNN's flash attention keeps (traced only)."""
    import jax
    import jax.numpy as jnp

    from jaxpipe.model import gpt

    @jax.custom_vjp
    def flash(q: Any, k: Any, v: Any) -> Any:
        return q + k + v

    def fwd(q: Any, k: Any, v: Any) -> Any:
        o = q + k + v  # the output's shape and dtype; the values are never computed
        stats = jnp.zeros((q.shape[0], q.shape[2], q.shape[1]), jnp.float32) + jnp.sum(q, axis=-1).transpose(0, 2, 1)
        return o, (q, k, v, o, stats)

    def bwd(res: Any, g: Any) -> Any:
        return g, g, g

    flash.defvjp(fwd, bwd)
    real = gpt.causal_attention
    gpt.causal_attention = lambda q, k, v, _impl: flash(q, k, v)  # type: ignore[assignment]
    try:
        yield
    finally:
        gpt.causal_attention = real


def _bytes(avals: Sequence[Any]) -> int:
    return sum(int(a.size) * a.dtype.itemsize for a in avals)


def _trace(model: ModelConfig, micro_batch: int, first: bool, last: bool, platform: str) -> ChunkBytes:
    """One layer (plus the embedding / head where `first` / `last`), traced (once per model and shape)."""
    return _trace_cached(dataclasses.astuple(model), micro_batch, first, last, platform)


@cache
def _trace_cached(model_fields: tuple[Any, ...], micro_batch: int, first: bool, last: bool,
                  platform: str) -> ChunkBytes:
    import jax
    import jax.numpy as jnp

    from jaxpipe.pipeline.stage import StageProgram

    cfg, cudnn = _model_for(ModelConfig(*model_fields), platform)
    # One layer of a 3-stage cut: stage 0 (first), 1 (middle) or 2 (last); a 1-stage cut is both ends.
    spec = StageSpec(0, 1, 0, 1) if first and last else StageSpec(0 if first else 2 if last else 1, 3,
                                                                  0 if first else 1, 1 if first else 2)
    prog = StageProgram(cfg, spec, micro_batch)
    with _flash_stand_in() if cudnn else contextlib.nullcontext():
        shapes = prog.param_shapes()
        x = (jax.ShapeDtypeStruct(prog.token_spec.shape, jnp.int32) if first
             else jax.ShapeDtypeStruct(prog.act_spec.shape, prog.act_spec.dtype))
        fn = (lambda p, x_: jax.vjp(prog._apply, p, x_)) if last else prog._forward  # L's forward: its vjp
        closed = jax.make_jaxpr(fn)(shapes, x)
    jaxpr = closed.jaxpr
    n_params = len(jax.tree.leaves(shapes))
    params_in = set(map(id, jaxpr.invars[:n_params]))
    outs = jaxpr.outvars[1:]  # [0] is the activation sent on, or the logits
    kept = [v.aval for v in outs if id(v) not in params_in and hasattr(v, "aval")]
    logits = _bytes([jaxpr.outvars[0].aval]) if last else 0
    return ChunkBytes(sum(int(s.size) for s in jax.tree.leaves(shapes)), _bytes(kept), logits)


def chunk_bytes(model: ModelConfig, spec: StageSpec, micro_batch: int, platform: str) -> ChunkBytes:
    """A chunk's parameters and one micro-batch's residuals: per-layer traces, scaled by its layers."""
    key = dataclasses.replace(model, n_layer=max(model.n_layer, 3))  # the traced stage cuts 3 layers
    end = _trace(key, micro_batch, spec.first, spec.last, platform)  # one layer, and the chunk's ends
    extra = spec.n_layers - 1
    middle = _trace(key, micro_batch, False, False, platform) if extra else ChunkBytes(0, 0, 0)
    return ChunkBytes(end.params + extra * middle.params, end.residual + extra * middle.residual, end.logits)


def rank_memory(cfg: Config, platform: str = "gpu") -> list[RankMemory]:
    """Each pipeline rank's predicted peak (per device: with runtime.devices_per_process = k each
    device holds the state and 1/k of each micro-batch's activations)."""
    schedule = config_schedule(cfg)
    partition = config_partition(cfg, schedule)
    k = cfg.runtime.devices_per_process
    mb = cfg.train.micro_batch_size
    mb_dev = max(1, mb // k)
    cfg_m, _ = _model_for(cfg.model, platform)
    act_msg = mb_dev * cfg.model.seq_len * cfg.model.d_model * (2 if cfg_m.dtype in ("bfloat16", "float16") else 4)
    out = []
    for rank in range(schedule.n_ranks):
        chunks = schedule.chunks_of(rank)
        model = cfg.stage_model(rank)
        per = {c: chunk_bytes(model, partition.stage(c), mb_dev, platform) for c in chunks}
        alive = held = peak = peak_held = 0
        for a in schedule.actions(rank):
            b = per[a.chunk]
            if a.op in (Op.F, Op.LI):
                alive, held = alive + b.residual, held + 1
                now = alive + (2 * b.logits if a.op == Op.LI else 0)
            elif a.op in (Op.B, Op.L, Op.I):
                now = alive + (int(FUSED_KEPT.get(model.remat, 1.0) * b.residual) + 2 * b.logits
                               if a.op == Op.L else 0)
                if a.op == Op.B:
                    alive, held = alive - b.residual, held - 1
            elif a.op == Op.W:
                now = alive
                alive, held = alive - b.residual, held - 1
            else:
                continue
            if now > peak:
                peak, peak_held = now, held + (a.op == Op.L)
        directions = (rank > 0 or any(c > 0 for c in chunks)) + (any(c < schedule.n_chunks - 1 for c in chunks))
        out.append(RankMemory(rank, STATE_BYTES_PER_PARAM * sum(b.params for b in per.values()), peak,
                              cfg.parallel.recv_lookahead * act_msg * directions, peak_held))
    return out


# ---- the check against the device ---------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryVerdict:
    level: str  # "ok", "warn" or "refuse"
    message: str  # empty when ok


def _describe(cfg: Config) -> str:
    p, t, m = cfg.parallel, cfg.train, cfg.model
    remat = f"parallel.stage_remat=[{','.join(p.stage_remat)}]" if p.stage_remat else f"model.remat={m.remat}"
    return (f"parallel.schedule={p.schedule}{f' +{p.extra_warmup}' if p.extra_warmup else ''}, {remat}, "
            f"train.micro_batch_size={t.micro_batch_size}")


def alternatives(cfg: Config) -> list[tuple[str, Config]]:
    """Settings to try instead, each a change of one or two keys a user would make, in the order
    they cost the least speed: the schedule, remat where needed, the micro-batch size, the partition."""
    p, t = cfg.parallel, cfg.train
    out: list[tuple[str, Config]] = []

    def alt(what: str, parallel: dict[str, Any] | None = None, train: dict[str, Any] | None = None,
            model: dict[str, Any] | None = None) -> None:
        c = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **(parallel or {})),
                                train=dataclasses.replace(cfg.train, **(train or {})),
                                model=dataclasses.replace(cfg.model, **(model or {})))
        out.append((what, c))

    if p.schedule == "gpipe" and p.virtual_stages == 1:
        alt("parallel.schedule=1f1b", {"schedule": "1f1b"})
    if p.schedule == "1f1b" and p.extra_warmup:
        alt("parallel.extra_warmup=0", {"extra_warmup": 0})
    for remat in ("dots", "block"):
        if p.stage_remat is None and cfg.model.remat != remat:
            alt(f"model.remat={remat}", model={"remat": remat})
        elif p.stage_remat is not None:
            alt(f"parallel.stage_remat=[{','.join([remat] * p.pp)}]", {"stage_remat": [remat] * p.pp})
    mb = t.micro_batch_size // 2
    while mb >= 1:
        if cfg.batch_per_replica % mb == 0:
            alt(f"train.micro_batch_size={mb}", train={"micro_batch_size": mb})
        mb //= 2
    if p.schedule == "gpipe" and p.virtual_stages == 1 and p.stage_remat is None and cfg.model.remat == "none":
        alt("parallel.schedule=1f1b with model.remat=dots", {"schedule": "1f1b"}, model={"remat": "dots"})
    for part in ("even", "balanced"):
        if p.partition != part:
            alt(f"parallel.partition={part}", {"partition": part})
    if p.virtual_stages == 1 and (counts := memory_partition(cfg)) is not None:
        alt(f"parallel.partition=[{','.join(map(str, counts))}]", {"partition": counts})
    return out


def memory_partition(cfg: Config, platform: str = "gpu") -> list[int] | None:
    """Layer counts per stage that lower the largest predicted peak: layers moved one at a time from
    the fullest stage to a neighbour while that helps (None where nothing moves)."""
    schedule = config_schedule(cfg)
    counts = list(config_partition(cfg, schedule).counts)
    start = list(counts)

    def worst(c: list[int]) -> tuple[int, int]:
        alt = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, partition=c))
        peaks = [r.peak for r in rank_memory(alt, platform)]
        return max(peaks), peaks.index(max(peaks))

    best, s = worst(counts)
    for _ in range(cfg.model.n_layer):
        tries = []
        for d in (s - 1, s + 1):
            if 0 <= d < len(counts) and counts[s] > 1:
                c = list(counts)
                c[s], c[d] = c[s] - 1, c[d] + 1
                tries.append((worst(c), c))
        if not tries or min(tries)[0][0] >= best:
            break
        (best, s), counts = min(tries)
    return counts if counts != start else None


def check_memory(cfg: Config, device_bytes: int | Sequence[int], platform: str = "gpu",
                 error: tuple[float, float] = ERROR_RANGE) -> MemoryVerdict:
    """Each rank's predicted peak against `device_bytes` (the allocator's limit on one device:
    `bytes_limit` of `jax.Device.memory_stats()`, which XLA_PYTHON_CLIENT_MEM_FRACTION sets).
    Refused past the limit by more than the model's largest over-prediction, warned about from its
    largest under-prediction below the limit; either names the alternatives that fit for sure.
    `device_bytes` per pipeline rank (the smallest device among its replicas), or one for all."""
    ranks = rank_memory(cfg, platform)
    limits = [device_bytes] * len(ranks) if isinstance(device_bytes, int) else list(device_bytes)
    lo, hi = error
    over = [r for r in ranks if r.peak > limits[r.rank] * (1 + lo)]
    if not over:
        return MemoryVerdict("ok", "")
    level = "refuse" if any(r.peak > limits[r.rank] * (1 + hi) for r in over) else "warn"
    limit = min(limits[r.rank] for r in over)
    stages = "; ".join(f"stage {r.rank} {r.peak / GiB:.1f} GiB (state {r.state / GiB:.1f}, activations of "
                       f"{r.held} micro-batch{'es' * (r.held != 1)} {r.activations / GiB:.1f})" for r in over)
    fits = []
    for what, alt in alternatives(cfg):
        try:
            peaks = [r.peak for r in rank_memory(alt, platform)]
        except ConfigError:
            continue
        if all(peak <= lim * (1 + lo) for peak, lim in zip(peaks, limits, strict=True)):
            fits.append(f"{what} ({max(peaks) / GiB:.1f} GiB)")
    hint = (f"settings predicted to fit: {'; '.join(fits[:4])}" if fits else
            "no single change is predicted to fit: use more pipeline stages (parallel.pp) or combine the changes")
    verb = "does not fit" if level == "refuse" else "may not fit"
    message = (f"predicted peak memory {verb} in the device's {limit / GiB:.1f} GiB ({_describe(cfg)}): "
               f"{stages}; the model's error on measured peaks is {lo:+.0%}..{hi:+.0%}; {hint}"
               + ("; runtime.memory_check=warn runs it anyway" if level == "refuse" else ""))
    return MemoryVerdict(level, message)


def check_device_memory(cfg: Config, device_bytes: Sequence[Sequence[int | None]], log: Any = None) -> None:
    """Set-up's memory check (on GPUs, before compiling; every rank computes the same verdict from the
    same gathered limits): raises ConfigError on `refuse` unless runtime.memory_check=warn; a warning
    goes to `log`. `device_bytes[stage]`: the limits of the devices of that stage's replicas (None
    where a device reports none: no check)."""
    if cfg.runtime.memory_check == "off" or any(b is None for stage in device_bytes for b in stage):
        return
    verdict = check_memory(cfg, [min(int(b) for b in stage if b is not None) for stage in device_bytes])
    if verdict.level == "refuse" and cfg.runtime.memory_check == "refuse":
        raise ConfigError(verdict.message)
    if verdict.level != "ok" and log is not None:
        log(f"warning: {verdict.message}")
