"""Typed run configuration: YAML file + ``--set key=value`` overrides, validated before anything runs.

The dataclass defaults *are* the embedded default job (a tiny GPT, 4 stages, on CPU), so
``mpiexec -n 4 jaxpipe train`` works with no file at all. Every key is checked against its
declared type so that a typo or a bad value fails on every rank with the key named, instead
of surfacing later as a shape error deep inside a compiled program.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from jaxpipe.errors import ConfigError
from jaxpipe.registry import DP_ALGORITHMS, SCHEDULES, Registry

# name: (n_layer, d_model, n_head). GPT-3 paper, Table 2.1; XL uses 16 heads as in the original
# system (24 does not divide 2048), 13B uses d_model 5120 (the paper's 5140 is not divisible by 40 heads).
MODEL_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(n_layer=8, d_model=128, n_head=4, seq_len=128, vocab_size=512),
    "125m": dict(n_layer=12, d_model=768, n_head=12),
    "350m": dict(n_layer=24, d_model=1024, n_head=16),
    "760m": dict(n_layer=24, d_model=1536, n_head=16),
    "xl": dict(n_layer=24, d_model=2048, n_head=16),
    "2.7b": dict(n_layer=32, d_model=2560, n_head=32),
    "6.7b": dict(n_layer=32, d_model=4096, n_head=32),
    "13b": dict(n_layer=40, d_model=5120, n_head=40),
    "175b": dict(n_layer=96, d_model=12288, n_head=96),
}
_GPT3_DEFAULTS = dict(seq_len=2048, vocab_size=50257)


@dataclass
class ModelConfig:
    preset: str = "tiny"
    n_layer: int = 8
    d_model: int = 128
    n_head: int = 4
    seq_len: int = 128
    vocab_size: int = 512
    # Compute dtype of activations, matmuls and messages; parameters and optimizer state stay float32.
    # "auto": bfloat16 on GPU, float32 on CPU.
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # Stack a stage's blocks under nn.scan (one compiled block body: fast compiles) or unroll them.
    scan_blocks: bool = True
    # Activation rematerialisation per block: keep nothing but block inputs ("block"), or keep the
    # matmul outputs and recompute the cheap element-wise parts ("dots").
    remat: Literal["none", "block", "dots"] = "none"
    init_std: float = 0.02
    ln_eps: float = 1e-5


@dataclass
class ParallelConfig:
    pp: int = 4
    # Replicas, or "auto": as many as the launched ranks allow (N / pp), so a job restarted on fewer hosts
    # (`jaxpipe supervise --elastic`) keeps the global batch with more micro-batches per replica.
    dp: int | Literal["auto"] = 1
    # A registered schedule's name (jaxpipe.registry.SCHEDULES, filled by jaxpipe.pipeline.schedule), e.g. 1f1b.
    schedule: str = "gpipe"
    # Model chunks per pipeline rank: the layers are cut into pp × virtual_stages chunks.
    virtual_stages: int = 1
    # A DP algorithm of jaxpipe.registry.DP_ALGORITHMS (jaxpipe.dp.algorithms): central_ps, sharded_ps,
    # allreduce, diloco.
    dp_mode: str = "central_ps"
    # "balanced" (by estimated cost), "even", per-chunk layer counts [2, 3, 3], or ranges [[0, 2], [2, 5], ...]
    # (one entry per chunk: pp × virtual_stages of them).
    partition: str | list[int] | list[list[int]] = "balanced"
    # Per-rank override of model.remat, e.g. [none, none, none, dots]: rematerialise only where
    # memory (or compile time: the last stage's fused program) needs it (all of a rank's chunks).
    stage_remat: list[str] | None = None
    # Relative speed of each stage's host, for `balanced` on unequal hosts (1.0 = nominal).
    stage_weights: list[float] | None = None
    # "mpi": mpi4py (CUDA-aware where the MPI library says so, host-staged otherwise); "nccl": GPU only.
    transport: Literal["mpi", "nccl"] = "mpi"
    # 1f1b only: warm-up forwards beyond P-1-s per stage, to hide message latency (see schedule.OneFOneB).
    extra_warmup: int = 0
    # How many receives each stage posts ahead of the task that needs them.
    recv_lookahead: int = 4
    # Wire dtype of the tied-embedding gradient exchange between the first and last stage. bfloat16
    # halves its bytes (412 MB -> 206 MB for GPT-3 XL: 1.6 s saved per step at 1 Gbit/s); int8 (absmax
    # per row, with error feedback) quarters them; both ends add the same wire values, so the two
    # copies of `wte` stay identical.
    tied_grad_dtype: Literal["float32", "bfloat16", "int8"] = "float32"
    # -- Compressed pipeline traffic (jaxpipe.comm.codec) --
    # Wire format of activations (forward) and of their gradients (backward) between ranks: none (the
    # compute dtype), bfloat16, float8 (e4m3 forward, e5m2 backward), int8 or int4 (two per byte); the
    # float8 and integer ones with an absmax scale per token row. Encoded and decoded on the device.
    act_codec: Literal["none", "bfloat16", "float8", "int8", "int4"] = "none"
    act_grad_codec: Literal["none", "bfloat16", "float8", "int8", "int4"] = "none"
    # AQ-SGD's delta mode: an activation travels as the act_codec-coded change since what the same
    # training sample's last visit delivered (both ends keep that copy; a first visit goes in int8).
    act_delta: bool = False
    # Where those copies live: null = host memory, or a directory for memory-mapped files.
    act_delta_dir: str | None = None
    # Which world rank runs which (stage, replica): a placement file (`jaxpipe plan --placement-out`);
    # unset = launch order, rank r runs stage r % pp of replica r // pp.
    placement: str | None = None
    # ---- data parallelism for slow links (jaxpipe.dp) ----
    # Wire format of the DP exchange (gradients; DiLoCo's pseudo-gradients and outer steps), with error
    # feedback: bfloat16, or int8 / int4 with one float32 scale per 1024 elements.
    grad_codec: Literal["none", "bfloat16", "int8", "int4"] = "none"
    # dp_mode=diloco: H inner steps per outer step, the outer step's exchange, outer Nesterov SGD,
    # and per-stage staggered outer steps.
    diloco_inner_steps: int = 50
    diloco_exchange: Literal["central_ps", "sharded_ps"] = "central_ps"
    diloco_outer_lr: float = 0.7
    diloco_outer_momentum: float = 0.9
    diloco_stagger: bool = False
    # dp_mode=streaming_diloco: fragments of strided layers that sync in turn (layer l in fragment l % F),
    # the steps each fragment's exchange runs behind before it merges, and the merge's weight of the local
    # parameters (local <- alpha·local + (1 - alpha)·outer).
    diloco_fragments: int = 2
    diloco_overlap_steps: int = 1
    diloco_merge_alpha: float = 0.5

    @property
    def replicas(self) -> int:
        """`dp` as a number: what everything after `resolve_world` (the trainer's set-up) uses."""
        if not isinstance(self.dp, int):
            raise ConfigError(DP_AUTO_UNRESOLVED)
        return self.dp


@dataclass
class TrainConfig:
    steps: int = 20
    global_batch_size: int = 16
    micro_batch_size: int = 2
    seed: int = 0
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 2
    # Length of the cosine decay; 0 means "train.steps".
    decay_steps: int = 0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    log_every: int = 1
    # Validation loss and perplexity every N steps through the same pipeline, forward only (0 = off),
    # over at most `eval_batches` batches of `global_batch_size` validation samples.
    eval_every: int = 0
    eval_batches: int = 4
    # Checkpoints every N steps and after the last step (0 = off), into `checkpoint_dir`, keeping the newest K.
    checkpoint_dir: str | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 3
    # Loss scaling: "auto" is dynamic for float16 compute and off otherwise.
    loss_scaling: Literal["auto", "off", "dynamic"] = "auto"
    loss_scale_init: float = 65536.0
    loss_scale_window: int = 1000  # Good steps before the scale doubles.
    # A step whose loss or gradients are not finite: stop the job, or drop the step on every rank.
    on_nonfinite: Literal["stop", "skip"] = "stop"
    # A checkpoint that cannot be written (disk full, write access lost): end the run (exit status 4), or
    # log it and train on. Either way nothing half-written is committed.
    on_save_error: Literal["stop", "warn"] = "stop"


@dataclass
class DataConfig:
    source: Literal["synthetic", "tokens"] = "synthetic"
    # For source=tokens: a directory written by `jaxpipe prepare-data` (train.bin, val.bin, meta.json,
    # tokenizer.json), or a flat array of token ids (raw binary, `dtype`).
    path: str | None = None
    # Validation tokens (a flat file); by default the prepared directory's val.bin.
    val_path: str | None = None
    dtype: Literal["uint16", "uint32"] = "uint16"
    seed: int = 1234
    # Visit the training samples in a new random order each epoch (a function of `seed` and the epoch).
    shuffle: bool = False


@dataclass
class NetworkConfig:
    """Emulated links (see jaxpipe.comm.netem): off while delay and rate are 0 and no pair is listed."""

    delay_ms: float = 0.0
    rate_gbit: float = 0.0  # 0 = unlimited
    # Per-pair overrides, directional: [src_rank, dst_rank, delay_ms, rate_gbit].
    pairs: list[list[float]] = field(default_factory=list)
    # Bytes charged per byte sent (lets a small CPU model stand in for large messages).
    size_scale: float = 1.0
    # A cluster file (jaxpipe.comm.cluster): every ordered pair of world ranks gets its delay and rate.
    matrix: str | None = None

    @property
    def enabled(self) -> bool:
        return self.delay_ms > 0 or self.rate_gbit > 0 or bool(self.pairs) or bool(self.matrix)


@dataclass
class RuntimeConfig:
    # GPUs (or forced host devices on CPU) per process; > 1 shards each micro-batch over them.
    devices_per_process: int = 1
    # Longest wait for a message or a collective (barrier, gradient sums) before the job is aborted
    # with a message naming what was awaited (at least 5x the previous step's time); a run's first step
    # (compilation along the pipeline), its first evaluation and checkpoint saves get
    # `first_step_timeout_s` instead. 0 = no deadline.
    comm_timeout_s: float = 300.0
    first_step_timeout_s: float = 1800.0
    # SIGTERM/SIGINT: every rank stops after the current step and commits a checkpoint; a job still running
    # this long after the signal exits without it (spot reclaim and Slurm's KillWait allow 30-120 s).
    preempt_grace_s: float = 120.0
    # On GPUs, each stage's predicted peak memory (jaxpipe.pipeline.memory) against its device's before
    # compiling: "refuse" a stage that cannot fit even within the model's measured error (warn where it
    # may not), "warn" only, or "off".
    memory_check: Literal["refuse", "warn", "off"] = "refuse"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    # Derived quantities, checked once in `validate` so every user can rely on them.
    @property
    def batch_per_replica(self) -> int:
        return self.train.global_batch_size // self.parallel.replicas

    def stage_model(self, stage: int) -> ModelConfig:
        """The model config one stage compiles with (its own remat, if parallel.stage_remat says)."""
        if self.parallel.stage_remat is None:
            return self.model
        remat: Any = self.parallel.stage_remat[stage]  # one of ModelConfig.remat's values: `validate` checked
        return dataclasses.replace(self.model, remat=remat)

    @property
    def n_chunks(self) -> int:
        return self.parallel.pp * self.parallel.virtual_stages

    @property
    def num_microbatches(self) -> int:
        return self.batch_per_replica // self.train.micro_batch_size


DP_AUTO_UNRESOLVED = ("parallel.dp=auto takes the replica count from the launched ranks (N / parallel.pp), and "
                      "this command runs without MPI: set parallel.dp to a number")


def resolve_world(cfg: Config, world_size: int) -> Config:
    """`cfg` with `parallel.dp=auto` replaced by world_size / parallel.pp, checked as a whole; other
    configs unchanged (Topology.create checks that their pp × dp is what was launched)."""
    p = cfg.parallel
    if p.dp != "auto":
        return cfg
    if world_size % p.pp:
        raise ConfigError(f"parallel.dp=auto: {world_size} launched ranks are not a multiple of parallel.pp "
                          f"({p.pp}): launch a multiple of {p.pp} ranks, or set parallel.dp")
    dp = world_size // p.pp
    resolved = dataclasses.replace(cfg, parallel=dataclasses.replace(p, dp=dp))
    try:
        validate(resolved)
    except ConfigError as e:
        raise ConfigError(f"{e} (parallel.dp=auto gave {dp}: {world_size} launched ranks / parallel.pp {p.pp}; "
                          f"launch a number of ranks whose replica count fits the batch, or set parallel.dp)") from None
    return resolved


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Checks `value` against the annotation `tp`; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{key}: expected null, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"unsupported config annotation {tp!r} for {key}")


def _section_from_dict(cls: type, values: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise ConfigError(
                f"unknown config key '{prefix}{key}' (known keys in '{prefix[:-1]}': {', '.join(sorted(names))})"
            )
    kwargs = {k: _coerce(v, hints[k], prefix + k) for k, v in values.items()}
    return cls(**kwargs)


def _apply_model_preset(model: dict[str, Any]) -> dict[str, Any]:
    preset = model.get("preset", "tiny")
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: {preset!r} is not one of {', '.join(MODEL_PRESETS)}")
    base = dict(MODEL_PRESETS[preset])
    if preset != "tiny":
        base = {**_GPT3_DEFAULTS, **base}
    return {**base, **model}


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--set {dotted}: keys look like section.name, e.g. parallel.pp=4")
    section = tree.setdefault(parts[0], {})
    if not isinstance(section, dict):
        raise ConfigError(f"--set {dotted}: '{parts[0]}' is not a section")
    section[parts[1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML, so `parallel.partition=[3,5]` gives a list."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value, e.g. train.steps=10")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r}: {e}") from None
    return key.strip(), value


def config_from_dict(tree: dict[str, Any]) -> Config:
    if not isinstance(tree, dict):
        raise ConfigError("the config file must be a mapping of sections (model, parallel, train, data)")
    sections = {f.name: f for f in dataclasses.fields(Config)}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown config section '{name}' (known: {', '.join(sections)})")
        if not isinstance(values, dict):
            raise ConfigError(f"config section '{name}' must be a mapping, got {values!r}")
    hints = typing.get_type_hints(Config)
    kwargs = {}
    for name in sections:
        values = dict(tree.get(name) or {})
        if name == "model":
            values = _apply_model_preset(values)
        kwargs[name] = _section_from_dict(hints[name], values, f"{name}.")
    cfg = Config(**kwargs)
    validate(cfg)
    return cfg


def read_yaml(path: str | Path, where: str) -> Any:
    """A YAML file's contents; a missing or malformed file is a ConfigError that starts with `where`
    (the key or flag that named it)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{where}: no such file")
    try:
        return yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                world_size: int | None = None) -> Config:
    """`world_size` (the launched ranks) resolves `parallel.dp=auto`; without it `auto` stays and the
    checks that need the replica count wait for `resolve_world`."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path, f"--config {path}") or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    cfg = config_from_dict(tree)
    return cfg if world_size is None else resolve_world(cfg, world_size)


# The keys whose choices are registered classes (jaxpipe.registry), with the registry each chooses from:
# `validate` checks that the value names one and runs that class's `validate_config`; the class, not this
# module, holds its rules.
REGISTERED: tuple[tuple[str, Registry[Any]], ...] = (("parallel.schedule", SCHEDULES),
                                                     ("parallel.dp_mode", DP_ALGORITHMS))


def validate(cfg: Config) -> None:
    """Cross-field checks that need no MPI and no devices: run identically on every rank."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    for key, value in [
        ("model.n_layer", m.n_layer), ("model.d_model", m.d_model), ("model.n_head", m.n_head),
        ("model.seq_len", m.seq_len), ("model.vocab_size", m.vocab_size), ("parallel.pp", p.pp),
        ("parallel.dp", p.dp if isinstance(p.dp, int) else 1), ("parallel.virtual_stages", p.virtual_stages),
        ("train.steps", t.steps), ("train.global_batch_size", t.global_batch_size),
        ("train.micro_batch_size", t.micro_batch_size), ("parallel.recv_lookahead", p.recv_lookahead),
        ("train.eval_batches", t.eval_batches), ("train.keep_checkpoints", t.keep_checkpoints),
        ("train.log_every", t.log_every), ("runtime.devices_per_process", cfg.runtime.devices_per_process),
        ("train.loss_scale_window", t.loss_scale_window), ("parallel.diloco_inner_steps", p.diloco_inner_steps),
    ]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
    # float16's loss scale: halved down to 1 at worst; a power of two keeps scaling exact.
    if not 1 <= t.loss_scale_init < float("inf"):
        raise ConfigError(f"train.loss_scale_init must be a finite number >= 1 (a power of two such as the "
                          f"default 65536 keeps scaling exact), got {t.loss_scale_init}")
    if m.d_model % m.n_head:
        raise ConfigError(f"model.d_model ({m.d_model}) must be divisible by model.n_head ({m.n_head})")
    if p.pp * p.virtual_stages > m.n_layer:
        what = (f"parallel.pp × parallel.virtual_stages ({p.pp} × {p.virtual_stages})" if p.virtual_stages > 1
                else f"parallel.pp ({p.pp})")
        raise ConfigError(f"{what} is larger than model.n_layer ({m.n_layer}): a stage would be empty")
    replicas_known = isinstance(p.dp, int)  # "auto": the checks below wait for resolve_world
    if isinstance(p.dp, int) and t.global_batch_size % p.dp:
        raise ConfigError(
            f"train.global_batch_size ({t.global_batch_size}) must be divisible by parallel.dp ({p.dp})"
        )
    if replicas_known and cfg.batch_per_replica % t.micro_batch_size:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) must divide the per-replica batch "
            f"(train.global_batch_size / parallel.dp = {cfg.batch_per_replica})"
        )
    k = cfg.runtime.devices_per_process
    if t.micro_batch_size % k:
        raise ConfigError(
            f"train.micro_batch_size ({t.micro_batch_size}) must be divisible by runtime.devices_per_process ({k}): "
            f"each micro-batch is split over the process's devices"
        )
    if replicas_known and cfg.num_microbatches > 4096:
        raise ConfigError(
            f"{cfg.num_microbatches} micro-batches per replica: at most 4096 (raise train.micro_batch_size)"
        )
    for key, registry in REGISTERED:  # the chosen class's own rules (parallel.extra_warmup for 1f1b, ...)
        section, name = key.split(".")
        registry.validate(getattr(getattr(cfg, section), name), cfg, key)
    if p.stage_remat is not None:
        if len(p.stage_remat) != p.pp:
            raise ConfigError(f"parallel.stage_remat has {len(p.stage_remat)} entries, need parallel.pp = {p.pp}")
        bad = [r for r in p.stage_remat if r not in ("none", "block", "dots")]
        if bad:
            raise ConfigError(f"parallel.stage_remat: {bad[0]!r} is not one of 'none', 'block', 'dots'")
    if p.stage_weights is not None:
        if len(p.stage_weights) != p.pp:
            raise ConfigError(f"parallel.stage_weights has {len(p.stage_weights)} entries, need parallel.pp = {p.pp}")
        if min(p.stage_weights) <= 0:
            raise ConfigError("parallel.stage_weights must all be positive")
    # A run shorter than its warm-up (train.steps only) trains with the warm-up clipped: effective_warmup.
    if t.decay_steps and t.warmup_steps >= t.decay_steps:
        raise ConfigError(
            f"train.warmup_steps ({t.warmup_steps}) must be smaller than train.decay_steps ({t.decay_steps})"
        )
    if t.lr <= 0 or t.min_lr < 0 or t.min_lr > t.lr:
        raise ConfigError(f"need 0 <= train.min_lr <= train.lr and train.lr > 0 (got lr={t.lr}, min_lr={t.min_lr})")
    net = cfg.network
    if net.delay_ms < 0 or net.rate_gbit < 0 or net.size_scale <= 0:
        raise ConfigError("network.delay_ms and network.rate_gbit must be >= 0 and network.size_scale > 0")
    world = p.pp * p.dp if isinstance(p.dp, int) else None
    for i, pair in enumerate(net.pairs if world is not None else []):
        assert world is not None
        if len(pair) != 4 or not all(0 <= int(r) < world and r == int(r) for r in pair[:2]) or pair[3] <= 0:
            raise ConfigError(
                f"network.pairs[{i}] = {pair}: expected [src_rank, dst_rank, delay_ms, rate_gbit] with ranks "
                f"in 0..{world - 1} and rate_gbit > 0"
            )
    if cfg.runtime.comm_timeout_s < 0 or cfg.runtime.first_step_timeout_s < 0:
        raise ConfigError("runtime.comm_timeout_s and runtime.first_step_timeout_s must be >= 0 (0 = no deadline)")
    if cfg.runtime.preempt_grace_s < 0:
        raise ConfigError("runtime.preempt_grace_s must be >= 0 (0 = no limit)")
    if cfg.data.source == "tokens" and not cfg.data.path:
        raise ConfigError("data.source is 'tokens' but data.path is not set")
    if t.eval_every < 0 or t.checkpoint_every < 0:
        raise ConfigError("train.eval_every and train.checkpoint_every must be >= 0 (0 = off)")
    if t.checkpoint_every and not t.checkpoint_dir:
        raise ConfigError("train.checkpoint_every is set but train.checkpoint_dir is not")
    _validate_codecs(cfg)


def _validate_codecs(cfg: Config) -> None:
    """Compressed pipeline traffic (jaxpipe.comm.codec): the combinations that cannot work."""
    p = cfg.parallel
    if "int4" in (p.act_codec, p.act_grad_codec) and cfg.model.d_model % 2:
        raise ConfigError(f"int4 packs two values per byte: model.d_model ({cfg.model.d_model}) must be even "
                          f"for parallel.act_codec / parallel.act_grad_codec = int4")
    if p.act_delta:
        if p.act_codec not in ("int8", "int4", "float8"):
            raise ConfigError(f"parallel.act_delta sends the act_codec-coded change of each activation: set "
                              f"parallel.act_codec to int4, int8 or float8 (got {p.act_codec!r})")
        if cfg.data.source != "tokens":
            raise ConfigError("parallel.act_delta keeps a copy per training sample and sends the change since its "
                              "last visit, but data.source=synthetic never visits a sample twice: use "
                              "data.source=tokens (or turn parallel.act_delta off)")
    elif p.act_delta_dir is not None:
        raise ConfigError("parallel.act_delta_dir is set but parallel.act_delta is off")


# ---- warm-up clipping (a run shorter than its warm-up) -------------------------------------------------


def effective_warmup(t: TrainConfig) -> int:
    """The warm-up the learning-rate schedule uses: `train.warmup_steps`, clipped to `train.steps - 1`
    when the decay length is the run's (`train.decay_steps` 0), so `--set train.steps=1` trains a
    step at the peak rate instead of being refused; the run's first line says so."""
    return t.warmup_steps if t.decay_steps else min(t.warmup_steps, max(0, t.steps - 1))
