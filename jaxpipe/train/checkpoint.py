"""Checkpoints: one orbax item per layer, written by the stages in parallel, committed atomically.

Layout of one checkpoint (`train.checkpoint_dir/step_00000100/`):

    embed/        orbax PyTree {"params": {wte, wpe}, "opt": {<slot>: same}}       written by stage 0
    layer_<i>/    {"params": <block i>, "opt": {"0_mu": <block i>, "0_nu": ...}}  by the stage holding i
    head/         {"params": {"ln_f": ...}, "opt": ...}                            by the last stage
    state.json    step, data position, seeds, optimizer counters, float16 loss scale, the run's config,
                  a checksum per file the ranks wrote
    extras/<name>.npy  per-rank state beyond parameters, written by the rank that owns it (every
                  replica's: the tied-embedding error feedback, delta mode's activation copies)
    tokenizer.json  copied from the prepared data directory, when there is one
    replicas/<d>/  (DiLoCo) replica d's own items and opt_scalars.json: replicas train apart
    dp/stage<s>_replica<r>.npz  what the data-parallel algorithm of that rank keeps (error-feedback
                  residues, DiLoCo's outer parameters and momentum), written by that rank
    COMMIT        written last: the step and the checksum of state.json

The layout is per layer, never per stage (keys as in `jaxpipe.model.gpt.flatten_per_layer`), so a
checkpoint written with one partition (PP, DP, layer split, scanned or unrolled blocks) loads into
a run with any other, and into the single-process model for sampling and export. The tied head's
`wte` is the embedding's (the trainer keeps both copies bit-identical), so only stage 0 writes it.

Writing: global rank 0 creates `step_N.tmp/`; then DP replica 0 of every stage writes its items into
it (each process its own item directories: orbax's multi-host coordination assumes `jax.distributed`,
which an MPI job does not start, so every process uses orbax as a single host) and checksums what
reached the disk; rank 0 gathers the checksums into state.json, writes COMMIT, fsyncs, and renames the
directory to `step_N/`. The rename is the commit: a job killed at any point before it leaves the
previous checkpoints untouched and at most a `.tmp` directory that readers ignore and the next save
removes. Each phase ends in a collective that carries every rank's outcome, so a failed write (disk
full, write access lost) is known to all ranks at once, nothing is committed, and every rank raises
the same CheckpointError naming the rank and the path.

Reading verifies: `verify` compares state.json with the checksum in COMMIT and each item a rank reads
with its checksum in state.json (checkpoints written before checksums existed carry none and are
taken as they are), so a damaged or incomplete checkpoint is refused, not loaded; `--resume auto`
then falls back to the previous one (jaxpipe.train.hooks.find_checkpoint).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.config import ModelConfig
from jaxpipe.errors import CheckpointError, ConfigError
from jaxpipe.model.gpt import Params, StageModel
from jaxpipe.model.layout import assemble_stage_params, flatten_per_layer
from jaxpipe.pipeline.partition import StageSpec

FORMAT = "jaxpipe.train.checkpoint.v1"
STATE_FILE = "state.json"
COMMIT_FILE = "COMMIT"
TOKENIZER_FILE = "tokenizer.json"
SCALARS_FILE = "opt_scalars.json"
EXTRAS_DIR = "extras"
_STEP_RE = re.compile(r"^step_(\d+)$")
# Model fields that fix parameter shapes: a checkpoint loads only into a model that agrees on all.
SHAPE_FIELDS = ("n_layer", "d_model", "n_head", "seq_len", "vocab_size", "arch", "n_kv_head", "d_ff",
                "tie_embeddings")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def committed(root: str | Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if (m := _STEP_RE.match(d.name)) and (d / COMMIT_FILE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(root: str | Path) -> Path | None:
    steps = committed(root)
    return steps[-1][1] if steps else None


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or the newest one inside a checkpoint root."""
    p = Path(path)
    if (p / COMMIT_FILE).is_file():
        return p
    if (newest := latest(p)) is not None:
        return newest
    if p.is_dir() and (p / STATE_FILE).is_file():
        raise ConfigError(f"checkpoint '{p}' was never committed (its save was interrupted)")
    raise ConfigError(f"no checkpoint at '{p}' (expected a step_N directory or a directory holding them)")


def read_state(ckpt: str | Path) -> dict[str, Any]:
    try:
        return json.loads((Path(ckpt) / STATE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"checkpoint '{ckpt}': cannot read {STATE_FILE}: {e}") from None


MODEL_DEFAULTS = dataclasses.asdict(ModelConfig())


def model_config(state: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    return ModelConfig(**{**state["config"]["model"], **overrides})


def check_compatible(state: Mapping[str, Any], model: ModelConfig, ckpt: str | Path) -> None:
    saved = {**MODEL_DEFAULTS, **state["config"]["model"]}  # (checkpoints from before model.arch)
    diff = [f"model.{k} {saved[k]} (checkpoint) vs {getattr(model, k)}" for k in SHAPE_FIELDS
            if saved[k] != getattr(model, k)]
    if diff:
        raise ConfigError(f"checkpoint '{ckpt}' is of another model: {'; '.join(diff)} (run with the checkpoint's "
                          f"model settings, or start afresh in another train.checkpoint_dir)")


# ---- Per-layer items ---------------------------------------------------------------------------------


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}}: a per-layer item's tree from its '/'-joined keys."""
    out: dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return out


def _per_item(model: ModelConfig, spec: StageSpec, tree: Params) -> dict[str, dict[str, Any]]:
    """A stage-shaped tree as {item: nested per-layer tree}, without the head's copy of `wte`."""
    flat = flatten_per_layer(model, spec.layers, spec.first, spec.last, tree)
    flat.pop("head/wte", None)
    return unflatten({k: np.asarray(v) for k, v in flat.items()})


def _key_name(k: Any) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _is_moment(x: Any) -> bool:
    # Optimizer slots shaped like the parameters (Adam's mu and nu) are dicts; counters are arrays.
    return isinstance(x, dict)


def _opt_parts(opt_state: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """({slot: params-shaped tree}, {path: scalar leaf}) of an optax state."""
    moments, scalars = {}, {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state, is_leaf=_is_moment)[0]:
        if _is_moment(leaf):
            moments["_".join(_key_name(k) for k in path)] = leaf
        else:
            scalars[jax.tree_util.keystr(path)] = leaf
    return moments, scalars


def rank_items(model: ModelConfig, specs: Mapping[int, StageSpec], params: Mapping[int, Params],
               opt_state: Any) -> dict[str, Any]:
    """What a rank writes for its chunks (`params` and the optimizer's moments keyed by chunk):
    {item name: {"params": ..., "opt": {slot: ...}}}."""
    items: dict[str, Any] = {}
    moments = _opt_parts(opt_state)[0]
    for c, spec in specs.items():
        chunk_items = {name: {"params": tree, "opt": {}} for name, tree in _per_item(model, spec, params[c]).items()}
        for slot, tree in moments.items():
            for name, sub in _per_item(model, spec, tree[c]).items():
                chunk_items[name]["opt"][slot] = sub
        items.update(chunk_items)
    return items


def opt_scalars(opt_state: Any) -> dict[str, dict[str, Any]]:
    """Optimizer counters (the same on every stage: they count updates), JSON-ready and exact."""
    out = {}
    for path, leaf in _opt_parts(opt_state)[1].items():
        value = np.asarray(leaf)
        out[path] = {"dtype": value.dtype.name, "value": value.tolist()}
    return out


def item_names(spec: StageSpec) -> list[str]:
    """The items a stage reads (the last stage reads its tied `wte` from `embed`)."""
    names = ["embed"] if (spec.first or spec.last) else []
    names += [f"layer_{i}" for i in spec.layers]
    return names + (["head"] if spec.last else [])


def _rel(subdir: str, name: str) -> str:
    return f"{subdir}/{name}" if subdir else name


def rank_item_names(specs: Mapping[int, StageSpec]) -> list[str]:
    """The items a rank with these chunks reads."""
    return sorted({n for spec in specs.values() for n in item_names(spec)})


# ---- Checksums --------------------------------------------------------------------------------------


def digest(path: str | Path) -> dict[str, Any]:
    """sha256 of a file, or of a directory's files (each one's relative path, size and bytes, in sorted
    order), with the byte and file counts, which make a truncation readable in the message."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h, total = hashlib.sha256(), 0
    for f in files:
        size = f.stat().st_size
        h.update(f.relative_to(path).as_posix().encode() + b"\0" + size.to_bytes(8, "little"))
        with open(f, "rb") as fh:
            h.update(hashlib.file_digest(fh, "sha256").digest())
        total += size
    return {"sha256": h.hexdigest(), "bytes": total, "files": len(files)}


def _mismatch(what: str, path: Path, want: Mapping[str, Any]) -> str | None:
    if not path.exists():
        return f"{what} is missing"
    got = digest(path)
    if got["sha256"] == want["sha256"]:
        return None
    if (got["bytes"], got["files"]) == (want["bytes"], want["files"]):
        return f"{what} does not match its checksum in {STATE_FILE} (same size: its bytes changed)"
    return (f"{what} does not match its checksum in {STATE_FILE} ({got['bytes']} bytes in {got['files']} file(s) on "
            f"disk, {want['bytes']} in {want['files']} written)")


def verify(ckpt: str | Path, names: Iterable[str] | None = None, files: bool = False) -> str | None:
    """None if the committed checkpoint is intact for a reader of items `names` (None: every item its
    state lists) and, with `files`, of the copied files; else what is damaged or missing."""
    ckpt = Path(ckpt)
    try:
        commit = (ckpt / COMMIT_FILE).read_text().split()
        raw = (ckpt / STATE_FILE).read_bytes()
    except OSError as e:
        return f"cannot read {Path(e.filename).name if e.filename else COMMIT_FILE}: {e.strerror or e}"
    if len(commit) >= 3 and commit[1] == "sha256" and hashlib.sha256(raw).hexdigest() != commit[2]:
        return f"{STATE_FILE} does not match its checksum in {COMMIT_FILE}"
    try:
        sums = json.loads(raw).get("checksums")
    except ValueError as e:
        return f"{STATE_FILE} is not valid JSON: {e}"
    if sums is None:  # written before checkpoints carried checksums: nothing to compare with
        return None
    for name in sums["items"] if names is None else names:
        if name not in sums["items"]:
            return f"item '{name}' is not in its {STATE_FILE} (incomplete)"
        if (bad := _mismatch(f"item '{name}'", ckpt / name, sums["items"][name])) is not None:
            return bad
    for name, want in sums["files"].items() if files else ():
        if (bad := _mismatch(f"file '{name}'", ckpt / name, want)) is not None:
            return bad
    return None


# ---- Writing ----------------------------------------------------------------------------------------


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durable(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


class OneProcess:
    """The communicator `save` needs, for a checkpoint written by one process outside MPI (tests, tools)."""

    def Get_rank(self) -> int:
        return 0

    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]


def save(
    root: str | Path,
    step: int,
    *,
    comm: Any,
    writer: bool,
    model: ModelConfig,
    specs: Mapping[int, StageSpec],
    params: Mapping[int, Params],
    opt_state: Any,
    state: dict[str, Any],
    files: Mapping[str, str | Path] | None = None,
    keep: int = 0,
    pause_before_commit: float = 0.0,
    subdir: str = "",
    arrays: Mapping[str, Mapping[str, np.ndarray]] | None = None,
    scalars: bool = False,
    extras: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Collective over `comm`: every rank calls it; ranks with `writer` write their chunks' items
    (into `subdir`: a replica's own directory when replicas differ, with its optimizer counters
    there too when `scalars`); every rank writes its `arrays` ({relative .npz path: arrays}).

    `state` (JSON) is written by `comm` rank 0 together with the optimizer counters of its stage and
    the checksums; `files` are copied into the checkpoint by rank 0. `keep` > 0 deletes all but the
    newest `keep`. `extras` (per rank, names unique over the job) are written by every rank, writer or
    not. `pause_before_commit` exists for tests that kill a save half-way. Raises
    CheckpointError on every rank if any rank failed; nothing is committed then.
    """
    import orbax.checkpoint as ocp

    root = Path(root).absolute()  # orbax takes absolute paths only
    final = root / step_name(step)
    tmp = root / (final.name + ".tmp")
    lead = comm.Get_rank() == 0

    def settle(errors: list[str | None]) -> None:
        failed = [(r, e) for r, e in enumerate(errors) if e is not None]
        if not failed:
            return
        if lead:
            shutil.rmtree(tmp, ignore_errors=True)
        rank, error = failed[0]
        others = f" (and on {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        newest = latest(root) if root.is_dir() else None
        raise CheckpointError(f"checkpoint save of step {step} failed on rank {rank}{others}, {error}; nothing was "
                              f"committed (newest committed checkpoint: {newest or 'none'})")

    def failure(doing: str, e: BaseException) -> str:
        return f"{doing}: {type(e).__name__}: {e}"

    error = None
    if lead:  # 1. the directory
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except Exception as e:
            error = failure(f"creating '{tmp}'", e)
    settle([comm.bcast(error, root=0)])
    sums: dict[str, Any] = {}  # relative path -> checksum of what reached the disk
    where = tmp
    try:  # 2. the items (a replica's own in `subdir`), the DP state, and their checksums
        if writer:
            checkpointer = ocp.PyTreeCheckpointer()
            base = tmp / subdir
            base.mkdir(parents=True, exist_ok=True)
            for name, tree in rank_items(model, specs, params, opt_state).items():
                where = base / name
                checkpointer.save(where, tree)
                sums[_rel(subdir, name)] = digest(where)
            if subdir and scalars:
                where = base / SCALARS_FILE
                _write_durable(where, json.dumps(opt_scalars(opt_state)) + "\n")
                sums[_rel(subdir, SCALARS_FILE)] = digest(where)
        for rel, values in (arrays or {}).items():
            where = tmp / rel
            _write_arrays(where, values)
            sums[rel] = digest(where)
        for name, array in (extras or {}).items():
            where = tmp / EXTRAS_DIR / f"{name}.npy"
            where.parent.mkdir(exist_ok=True)
            with open(where, "wb") as fh:
                np.save(fh, np.asarray(array))
                fh.flush()
                os.fsync(fh.fileno())
            sums[f"{EXTRAS_DIR}/{name}.npy"] = digest(where)
    except Exception as e:
        error = failure(f"writing '{where}'", e)
    outcomes = comm.allgather((error, sums))
    settle([e for e, _ in outcomes])
    if lead:  # 3. state.json and COMMIT, then the rename that commits
        try:
            copied = {}
            for name, src in (files or {}).items():
                shutil.copyfile(src, tmp / name)
                copied[name] = digest(tmp / name)
            items = {name: d for _, rank_sums in outcomes for name, d in rank_sums.items()}
            meta = {"format": FORMAT, **state, "step": step, "opt_scalars": opt_scalars(opt_state),
                    "saved_at": time.time(), "checksums": {"algorithm": "sha256", "items": items, "files": copied}}
            text = json.dumps(meta, indent=2) + "\n"
            _write_durable(tmp / STATE_FILE, text)
            if pause_before_commit:
                time.sleep(pause_before_commit)
            _write_durable(tmp / COMMIT_FILE, f"{step}\nsha256 {hashlib.sha256(text.encode()).hexdigest()}\n")
            _fsync(tmp)
            old = root / (final.name + ".old")
            if final.exists():  # Saving a step again (a resumed run from an older checkpoint).
                shutil.rmtree(old, ignore_errors=True)
                final.rename(old)
            tmp.rename(final)
            _fsync(root)
            shutil.rmtree(old, ignore_errors=True)
        except Exception as e:
            error = failure(f"committing '{final}'", e)
    settle([comm.bcast(error, root=0)])
    if lead and keep > 0:
        prune(root, keep)
    return final


def check_writable(root: str | Path, key: str, hint: str = "set train.checkpoint_every=0") -> None:
    """Creates `root` if needed and writes and removes a file in it: a directory this process
    cannot write fails before the run starts, with what to change, not at the first save. (A real
    write, not a permission test: root passes those, and a read-only file system does not.)"""
    path = Path(root)
    probe = path / f".jaxpipe-write-test-{socket.gethostname()}-{os.getpid()}"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        why = e.strerror or type(e).__name__
        where = f" ({e.filename})" if e.filename and str(e.filename) not in (str(root), str(probe)) else ""
        raise ConfigError(f"{key} '{root}' cannot be written: {why}{where}; choose a directory this job can "
                          f"write on every host, or {hint}") from None


def _write_arrays(path: Path, values: Mapping[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        np.savez(f, **dict(values))  # type: ignore[arg-type]
        f.flush()
        os.fsync(f.fileno())


def read_arrays(ckpt: str | Path, rel: str) -> dict[str, np.ndarray] | None:
    """The arrays a rank saved under `rel`, or None if there are none."""
    path = Path(ckpt) / rel
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def prune(root: str | Path, keep: int) -> None:
    """Deletes all but the newest `keep` committed checkpoints, and leftovers of interrupted saves
    (best effort: a directory that cannot be deleted stays, and readers ignore leftovers)."""
    steps = committed(root)
    for _, d in steps[: max(len(steps) - keep, 0)]:
        shutil.rmtree(d, ignore_errors=True)
    newest = steps[-1][0] if steps else -1
    for d in Path(root).iterdir():
        m = re.match(r"^step_(\d+)\.(tmp|old)$", d.name)
        if m and int(m.group(1)) <= newest:  # Older than a committed checkpoint: nobody is writing it.
            shutil.rmtree(d, ignore_errors=True)


# ---- Reading ----------------------------------------------------------------------------------------


def read_extra(ckpt: str | Path, name: str) -> np.ndarray | None:
    """A rank's extra state `name` (see `save`), memory-mapped, after its checksum is checked; None
    if the checkpoint has none."""
    rel = f"{EXTRAS_DIR}/{name}.npy"
    path = Path(ckpt) / rel
    if not path.is_file():
        return None
    if (bad := verify(ckpt, [rel])) is not None:
        raise ConfigError(f"checkpoint '{ckpt}' is damaged or incomplete: {bad}")
    return np.load(path, mmap_mode="r")


def read_items(ckpt: str | Path, names: list[str], verify_first: bool = True, subdir: str = "") -> dict[str, Any]:
    """The items `names` (in `subdir`: a replica's own), verified against their checksums first
    (unless the caller just did)."""
    import orbax.checkpoint as ocp

    ckpt = Path(ckpt).absolute()
    if verify_first and (bad := verify(ckpt, [_rel(subdir, n) for n in names
                                              if (ckpt / subdir / n).is_dir()])) is not None:
        raise ConfigError(f"checkpoint '{ckpt}' is damaged or incomplete: {bad}")
    checkpointer = ocp.PyTreeCheckpointer()
    out = {}
    for name in names:
        if not (ckpt / subdir / name).is_dir():
            n_layer = read_state(ckpt)["config"]["model"]["n_layer"]
            raise ConfigError(f"checkpoint '{ckpt}' has no item '{name}' (it holds a {n_layer}-layer model)")
        out[name] = checkpointer.restore(ckpt / subdir / name)
    return out


def _assemble(model: ModelConfig, spec: StageSpec, items: Mapping[str, Any], pick: Any) -> Params:
    """A stage-shaped tree from per-layer items; `pick(item)` selects params or one optimizer slot."""
    embed = pick(items["embed"]) if (spec.first or spec.last) else None
    head = pick(items["head"]) if spec.last else None
    tied = model.tie_embeddings
    return assemble_stage_params(
        model,
        [pick(items[f"layer_{i}"]) for i in spec.layers],
        embedding=embed if spec.first else None,
        final_ln=head["ln_f"] if head is not None else None,
        wte=embed["wte"] if (embed is not None and tied and spec.last and not spec.first) else None,
        lm_head=head["lm_head"] if (head is not None and not tied) else None,
    )


def _like(tree: Params, template: Params, what: str) -> Params:
    """`tree` with `template`'s structure, dtypes and placement (sharding), or a ConfigError."""
    if jax.tree.structure(tree) != jax.tree.structure(template):  # type: ignore[operator]  # jaxlib's stub
        raise ConfigError(f"checkpoint {what} do not have this stage's layout: "
                          f"{jax.tree.structure(tree)} vs {jax.tree.structure(template)}")

    def put(path: Any, x: Any, t: Any) -> jax.Array:
        if tuple(x.shape) != tuple(t.shape):
            raise ConfigError(f"checkpoint {what} {jax.tree_util.keystr(path)}: shape {tuple(x.shape)}, "
                              f"the model needs {tuple(t.shape)}")
        return jax.device_put(jnp.asarray(x, t.dtype), getattr(t, "sharding", None))

    return jax.tree_util.tree_map_with_path(put, tree, template)


def load_stage(ckpt: str | Path, model: ModelConfig, spec: StageSpec, params_template: Params) -> Params:
    """One chunk's parameters from a checkpoint written with any partition; the template fixes
    structure, dtype and device placement."""
    items = read_items(ckpt, item_names(spec))
    return _like(_assemble(model, spec, items, lambda it: it["params"]), params_template, "parameters")


def load_rank(ckpt: str | Path, model: ModelConfig, specs: Mapping[int, StageSpec],
              params_template: Mapping[int, Params], opt_template: Any,
              verify_first: bool = True, subdir: str = "") -> tuple[dict[int, Params], Any]:
    """A rank's chunks' parameters and its optimizer state (moments keyed by chunk, as the
    templates are) from a checkpoint written with any partition and any number of chunks per rank
    (`subdir`: a replica's own directory)."""
    state = read_state(ckpt)
    if subdir:
        try:
            state = {"opt_scalars": json.loads((Path(ckpt) / subdir / SCALARS_FILE).read_text())}
        except (OSError, ValueError) as e:
            raise ConfigError(f"checkpoint '{ckpt}': cannot read {subdir}/{SCALARS_FILE}: {e}") from None
    names = rank_item_names(specs)
    items = read_items(ckpt, names, verify_first, subdir)
    params = {c: _like(_assemble(model, spec, items, lambda it: it["params"]), params_template[c], "parameters")
              for c, spec in specs.items()}
    leaves, treedef = jax.tree_util.tree_flatten_with_path(opt_template, is_leaf=_is_moment)
    scalars = state.get("opt_scalars", {})
    filled = []
    for path, leaf in leaves:
        if _is_moment(leaf):
            slot = "_".join(_key_name(k) for k in path)
            try:
                tree = {c: _like(_assemble(model, spec, items, lambda it, s=slot: it["opt"][s]), leaf[c],
                                 f"optimizer slot {slot}") for c, spec in specs.items()}
            except KeyError:
                raise ConfigError(f"checkpoint '{ckpt}' has no optimizer slot '{slot}'") from None
            filled.append(tree)
        else:
            key = jax.tree_util.keystr(path)
            if key not in scalars:
                raise ConfigError(f"checkpoint '{ckpt}' has no optimizer counter '{key}'")
            value = np.asarray(scalars[key]["value"], scalars[key]["dtype"])
            filled.append(jax.device_put(jnp.asarray(value, leaf.dtype), getattr(leaf, "sharding", None)))
    return params, jax.tree_util.tree_unflatten(treedef, filled)


def load_flat(ckpt: str | Path) -> tuple[ModelConfig, dict[str, np.ndarray]]:
    """The whole model's parameters keyed per layer (`embed/wte`, `layer_3/qkv/kernel`, `head/ln_f/scale`)."""
    ckpt = resolve(ckpt)
    model = model_config(read_state(ckpt))
    names = ["embed", *(f"layer_{i}" for i in range(model.n_layer)), "head"]
    flat: dict[str, np.ndarray] = {}
    for name, item in read_items(ckpt, names).items():
        for path, leaf in jax.tree_util.tree_flatten_with_path(item["params"])[0]:
            flat[name + "/" + "/".join(_key_name(k) for k in path)] = np.asarray(leaf)
    return model, flat


def load_model(ckpt: str | Path, **model_overrides: Any) -> tuple[ModelConfig, Params]:
    """The whole model (a StageModel that is first and last) for sampling, export and tests;
    `model_overrides` may change fields that do not fix shapes, e.g. scan_blocks or dtype."""
    ckpt = resolve(ckpt)
    model = model_config(read_state(ckpt), **model_overrides)
    spec = StageSpec(index=0, n_stages=1, start=0, stop=model.n_layer)
    module = StageModel(model, n_layers=model.n_layer, first=True, last=True)
    tokens = jnp.zeros((1, model.seq_len), jnp.int32)
    template = jax.eval_shape(module.init, jax.random.PRNGKey(0), tokens)["params"]
    return model, load_stage(ckpt, model, spec, template)


def write_params(out: str | Path, model: ModelConfig, items: Iterable[tuple[str, Params]],
                 state: Mapping[str, Any], files: Mapping[str, str | Path] | None = None) -> Path:
    """A parameters-only checkpoint written by one process, item by item as `items` yields them (so a
    converter holds one layer at a time): `out/` gets the per-layer items ({"params": tree}), the
    copied `files`, state.json (`state` plus the model section and checksums) and COMMIT, and appears
    only complete (written as `out.tmp/`, then renamed). Loads like any checkpoint: `load_flat`,
    `load_stage` at any layout, and `train.init_from` (no optimizer state: it starts fresh there)."""
    import orbax.checkpoint as ocp

    out = Path(out).absolute()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    checkpointer = ocp.PyTreeCheckpointer()
    sums: dict[str, Any] = {}
    for name, tree in items:
        checkpointer.save(tmp / name, {"params": tree})
        sums[name] = digest(tmp / name)
    copied = {}
    for name, src in (files or {}).items():
        shutil.copyfile(src, tmp / name)
        copied[name] = digest(tmp / name)
    meta = {"format": FORMAT, "step": 0, **state, "config": {"model": dataclasses.asdict(model)},
            "saved_at": time.time(), "checksums": {"algorithm": "sha256", "items": sums, "files": copied}}
    text = json.dumps(meta, indent=2) + "\n"
    _write_durable(tmp / STATE_FILE, text)
    _write_durable(tmp / COMMIT_FILE, f"0\nsha256 {hashlib.sha256(text.encode()).hexdigest()}\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
