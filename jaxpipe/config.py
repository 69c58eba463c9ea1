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
from jaxpipe.registry import ACT_CODECS, DP_ALGORITHMS, GRAD_CODECS, SCHEDULES, Registry

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
# LLaMA-family shapes of released models (their config.json), so `plan` and the cost model see real
# sizes. seq_len is the training length (the models' RoPE takes longer contexts; no parameter depends on it).
LLAMA_PRESETS: dict[str, dict[str, Any]] = {
    "tinyllama-1.1b": dict(n_layer=22, d_model=2048, n_head=32, n_kv_head=4, d_ff=5632, vocab_size=32000,
                           seq_len=2048, rope_theta=10000.0, tie_embeddings=False),
    "llama-3.2-1b": dict(n_layer=16, d_model=2048, n_head=32, n_kv_head=8, d_ff=8192, vocab_size=128256,
                         seq_len=2048, rope_theta=500000.0, tie_embeddings=True, rope_scaling="llama3"),
    "llama-3.2-3b": dict(n_layer=28, d_model=3072, n_head=24, n_kv_head=8, d_ff=8192, vocab_size=128256,
                         seq_len=2048, rope_theta=500000.0, tie_embeddings=True, rope_scaling="llama3"),
}


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
    # The LayerNorm's epsilon (gpt3), or the RMSNorm's (llama).
    ln_eps: float = 1e-5
    # -- Architecture: gpt3 (LayerNorm, GELU MLP, learned positions, biases) or llama (RMSNorm, SwiGLU
    # MLP, rotary positions, grouped-query attention, no biases); see jaxpipe.model.llama.
    arch: Literal["gpt3", "llama"] = "gpt3"
    # Key/value heads (grouped-query attention; llama only): 0 = n_head.
    n_kv_head: int = 0
    # Hidden width of the MLP: 0 = 4 × d_model (gpt3); llama needs it set.
    d_ff: int = 0
    # Input embedding and LM head share one matrix (and the pipeline's first and last stages keep it
    # equal by the tied-embedding exchange), or are two (no exchange at all).
    tie_embeddings: bool = True
    # RoPE (llama): base θ, and Llama 3.1's frequency scaling ("llama3") with its four parameters.
    rope_theta: float = 10000.0
    rope_scaling: Literal["none", "llama3"] = "none"
    rope_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_max_len: int = 8192

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ffn_dim(self) -> int:
        return self.d_ff or 4 * self.d_model


@dataclass
class ParallelConfig:
    pp: int = 4
    # Replicas, or "auto": as many as the launched ranks allow (N / pp), so a job restarted on fewer hosts
    # (`jaxpipe supervise --elastic`) keeps the global batch with more micro-batches per replica.
    dp: int | Literal["auto"] = 1
    # A registered schedule's name (jaxpipe.registry.SCHEDULES, filled by jaxpipe.pipeline.schedule), e.g.
    # 1f1b, or gpipe_ring (GPipe with the LM head on the first rank: pp + 1 chunks, no tied-embedding exchange).
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
    # -- Compressed pipeline traffic (jaxpipe.comm.codec; the choices: jaxpipe.registry.ACT_CODECS) --
    # Wire format of activations (forward) and of their gradients (backward) between ranks: none (the
    # compute dtype), bfloat16, float8 (e4m3 forward, e5m2 backward), int8, int4 (two per byte, a scale
    # per act_int4_group values), int4_sr (int4 rounded stochastically in training: unbiased; meant for the
    # gradients) or int4_row (a scale per token row); float8, int8 and int4_row with an
    # absmax scale per token row. Encoded and decoded on the device.
    act_codec: str = "none"
    act_grad_codec: str = "none"
    # Values per bfloat16 scale of the int4 codec (an even divisor of model.d_model): 4 + 16/group bits
    # per value; finer groups keep the loss (BENCHMARKS.md, "int4 within 1 %").
    act_int4_group: int = 32
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
    grad_codec: str = "none"  # one of jaxpipe.registry.GRAD_CODECS
    # dp_mode=diloco: H inner steps per outer step, the outer step's exchange, outer Nesterov SGD,
    # and per-stage staggered outer steps.
    diloco_inner_steps: int = 50
    diloco_exchange: Literal["central_ps", "sharded_ps"] = "central_ps"
    # Plain averaging (lr 1, momentum 0): best or within 0.9 points of the best outer setting at every
    # (M, H) of the sweep (BENCHMARKS.md "DiLoCo outer settings"); the paper's Nesterov 0.7 / 0.9 lost
    # 10-19 points more there.
    diloco_outer_lr: float = 1.0
    diloco_outer_momentum: float = 0.0
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
    # Fine-tuning: start from this checkpoint's weights (e.g. one `jaxpipe import-hf` wrote) with a fresh
    # optimizer and step 0. The run adopts the checkpoint's model section; model keys set otherwise are
    # refused (jaxpipe.train.finetune). Unlike --resume, nothing but the parameters is read.
    init_from: str | None = None


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
    # SIGTERM/SIGINT: every rank stops at a step boundary (after the step in which the world learns of the
    # signal: without runtime.step_barrier, a step later) and commits a checkpoint; a job still running
    # this long after the signal exits without it (spot reclaim and Slurm's KillWait allow 30-120 s).
    preempt_grace_s: float = 120.0
    # A world barrier at the start of every step, as the original timed its iterations (tools/bench.py and
    # tools/reproduce_seed.py turn it on). Off, a step waits only for what its update needs, and the
    # step's world sums (loss, stop verdicts) are read one step later.
    step_barrier: bool = False
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
        """Model chunks: as the schedule cuts them (pp × virtual_stages; gpipe_ring one more)."""
        p = self.parallel
        return int(SCHEDULES.get(p.schedule).chunk_count(p.pp, p.virtual_stages))

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
    if preset == "hf":  # a model section `jaxpipe import-hf` wrote: every key is there
        return model
    if preset in LLAMA_PRESETS:
        return {"arch": "llama", **LLAMA_PRESETS[preset], **model}
    if preset not in MODEL_PRESETS:
        raise ConfigError(f"model.preset: {preset!r} is not one of {', '.join([*MODEL_PRESETS, *LLAMA_PRESETS])} "
                          f"(or hf: a model imported by `jaxpipe import-hf`)")
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
    checks that need the replica count wait for `resolve_world`. (With `train.init_from`, load through
    `jaxpipe.train.finetune.load_config`, which adopts the checkpoint's model section.)"""
    cfg = config_from_dict(load_tree(path, overrides))
    return cfg if world_size is None else resolve_world(cfg, world_size)


def load_tree(path: str | Path | None = None, overrides: list[str] | None = None) -> dict[str, Any]:
    """The config file with the overrides applied, as given (no presets, defaults or checks yet)."""
    tree: dict[str, Any] = {}
    if path is not None:
        tree = read_yaml(path, f"--config {path}") or {}
    for text in overrides or []:
        key, value = parse_override(text)
        _set_dotted(tree, key, value)
    return tree


# The keys whose choices are registered classes (jaxpipe.registry), with the registry each chooses from:
# `validate` checks that the value names one and runs that class's `validate_config`; the class, not this
# module, holds its rules.
REGISTERED: tuple[tuple[str, Registry[Any]], ...] = (
    ("parallel.schedule", SCHEDULES), ("parallel.dp_mode", DP_ALGORITHMS), ("parallel.act_codec", ACT_CODECS),
    ("parallel.act_grad_codec", ACT_CODECS), ("parallel.grad_codec", GRAD_CODECS))


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
    _validate_arch(m)
    if cfg.n_chunks > m.n_layer:
        what = (f"parallel.pp × parallel.virtual_stages ({p.pp} × {p.virtual_stages})" if p.virtual_stages > 1
                else f"parallel.pp ({p.pp})" if cfg.n_chunks == p.pp
                else f"parallel.schedule={p.schedule}'s {cfg.n_chunks} chunks")
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
    chosen = [(key, registry, getattr(getattr(cfg, key.split(".")[0]), key.split(".")[1]))
              for key, registry in REGISTERED]
    for key, registry, value in chosen:  # every key names a class before any class's rules run
        registry.get(value, key)
    for key, registry, value in chosen:  # the chosen class's own rules (parallel.extra_warmup for 1f1b, ...)
        registry.validate(value, cfg, key)
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


def _validate_arch(m: ModelConfig) -> None:
    """The architecture keys (model.arch and what only llama reads)."""
    if m.n_kv_head < 0 or m.d_ff < 0:
        raise ConfigError(f"model.n_kv_head and model.d_ff must be >= 0 (0 = the default), got {m.n_kv_head} "
                          f"and {m.d_ff}")
    if m.arch == "gpt3":
        llama_only = [f"model.{k}" for k, default in (("n_kv_head", 0), ("rope_scaling", "none"))
                      if getattr(m, k) != default]
        if llama_only:
            raise ConfigError(f"{', '.join(llama_only)} apply to model.arch=llama only (GPT-3 has multi-head attention "
                              f"and learned positions): set model.arch=llama or leave them at their defaults")
        return
    if m.n_head % m.kv_heads:
        raise ConfigError(f"model.n_head ({m.n_head}) must be a multiple of model.n_kv_head ({m.n_kv_head}): "
                          f"each key/value head serves an equal group of query heads")
    if not m.d_ff:
        raise ConfigError("model.arch=llama needs model.d_ff (the SwiGLU MLP's hidden width, e.g. 8192 for "
                          "Llama-3.2-1B): set it, or use a llama preset")
    if (m.d_model // m.n_head) % 2:
        raise ConfigError(f"rotary positions rotate pairs of channels: the head width model.d_model / model.n_head "
                          f"({m.d_model // m.n_head}) must be even")
    if m.rope_theta <= 0:
        raise ConfigError(f"model.rope_theta must be > 0, got {m.rope_theta}")
    if m.rope_scaling == "llama3" and not (m.rope_factor > 0 and m.rope_high_freq_factor > m.rope_low_freq_factor > 0
                                           and m.rope_original_max_len > 0):
        raise ConfigError("model.rope_scaling=llama3 needs model.rope_factor > 0, model.rope_high_freq_factor > "
                          "model.rope_low_freq_factor > 0 and model.rope_original_max_len > 0")


# ---- warm-up clipping (a run shorter than its warm-up) -------------------------------------------------


def effective_warmup(t: TrainConfig) -> int:
    """The warm-up the learning-rate schedule uses: `train.warmup_steps`, clipped to `train.steps - 1`
    when the decay length is the run's (`train.decay_steps` 0), so `--set train.steps=1` trains a
    step at the peak rate instead of being refused; the run's first line says so."""
    return t.warmup_steps if t.decay_steps else min(t.warmup_steps, max(0, t.steps - 1))
