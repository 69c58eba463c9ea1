"""What a real training run adds around the step loop: resume, evaluation and checkpoints.

Kept out of the trainer so its loop stays about steps: the trainer calls `restore` once after
initialising parameters and optimizer state, and `after_step` after every optimizer update. Both
are collective over the world communicator, like a step.

Exact resume needs nothing but the step: parameters and optimizer state (moments and update
counter, hence the learning-rate schedule) and float16's loss scale (scale and good-step count)
come from the checkpoint, the data stream is addressed by step (`jaxpipe.data.source`), and
initialisation is the only use of the seed. A resumed run therefore
computes bit-for-bit what the uninterrupted run computes, given the same partition and hardware.

State beyond that (`stateful`: objects with `extra_state()` -> {name: array} and
`load_extra_state(get)`, e.g. the tied embedding's int8 error feedback and delta mode's activation
copies) is saved by the rank that holds it and handed back to it on resume.

What a run resumes from is verified first (`find_checkpoint`: every rank checks the checksums of the
items it will read); `--resume auto` skips a damaged or incomplete newest checkpoint for the previous
one. A save that fails (`train.on_save_error`) and a preemption (`stop_preempted`) end here too.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NoReturn, TextIO

import numpy as np

from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import Transport
from jaxpipe.config import Config
from jaxpipe.data.source import make_val_source, resolve_token_files
from jaxpipe.dp.base import DataParallel
from jaxpipe.dp.sync import algorithm
from jaxpipe.errors import CheckpointError, ConfigError, Preempted, agree
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.partition import Partition
from jaxpipe.pipeline.schedule import Schedule
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime.preempt import PREEMPT
from jaxpipe.runtime.trace import TRACE
from jaxpipe.runtime.watchdog import ACTIVITY
from jaxpipe.train import checkpoint
from jaxpipe.train.evaluate import Evaluator, eval_batch_count, perplexity
from jaxpipe.train.optimizer import LossScaler


def _compatible(cfg: Config, ckpt: Path, ranges: list[list[int]] | None) -> dict[str, Any]:
    """The checkpoint's state, if it was written by a run of this model and global batch (and, for
    replicas that train apart, this data-parallel layout; `ranges`: this run's layers per chunk)."""
    state = checkpoint.read_state(ckpt)
    checkpoint.check_compatible(state, cfg.model, ckpt)
    saved = state["config"]["train"]["global_batch_size"]
    if saved != cfg.train.global_batch_size:
        raise ConfigError(f"checkpoint '{ckpt}' was trained with train.global_batch_size {saved}, this run "
                          f"uses {cfg.train.global_batch_size}: the data position would not carry over")
    check_dp_layout(cfg, state, ckpt, ranges)
    return state


def check_resume(cfg: Config, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
    """Without MPI (`jaxpipe train --dry-run`): the checkpoint `resume` names and its state, checked
    against this run's model and batch; None to start afresh. The run itself verifies the items
    (find_checkpoint)."""
    if not resume:
        return None
    if resume == "auto":
        if not cfg.train.checkpoint_dir:
            raise ConfigError("--resume auto looks in train.checkpoint_dir, which is not set")
        if (ckpt := checkpoint.latest(cfg.train.checkpoint_dir)) is None:
            return None
    else:
        ckpt = checkpoint.resolve(resume)
    return ckpt, _compatible(cfg, ckpt, None)


def replica_dir(replica: int) -> str:
    """Where a DiLoCo replica's own items live in a checkpoint (replica 0: the top level)."""
    return f"replicas/{replica}" if replica else ""


def dp_file(stage: int, replica: int) -> str:
    """The file of a rank's data-parallel state (error-feedback residues, DiLoCo's outer step)."""
    return f"dp/stage{stage}_replica{replica}.npz"


def rank_reads(cfg: Config, stage: int, replica: int, specs: dict[int, Any]) -> Callable[[dict[str, Any]], list[str]]:
    """What a rank reads from a checkpoint, given its state: its chunks' items (a DiLoCo replica's own
    when the checkpoint's replicas train apart, with their optimizer counters), and its DP state if
    the checkpoint holds it. The checksums of exactly these are verified before a resume."""
    own = algorithm(cfg.parallel.dp_mode).per_replica_params

    def reads(state: dict[str, Any]) -> list[str]:
        sub = replica_dir(replica) if own and state.get("dp", {}).get("per_replica") else ""
        names = [f"{sub}/{n}" if sub else n for n in checkpoint.rank_item_names(specs)]
        if sub and stage == 0:
            names.append(f"{sub}/{checkpoint.SCALARS_FILE}")
        if dp_file(stage, replica) in state.get("checksums", {}).get("items", {}):
            names.append(dp_file(stage, replica))
        return names

    return reads


def _damage(cfg: Config, ckpt: Path, reads: Callable[[dict[str, Any]], list[str]], lead: bool,
            ranges: list[list[int]] | None) -> str | None:
    """What is damaged in `ckpt` for this rank (None: intact); ConfigError if it is intact but not this
    run's. Checks state.json before the items, so another model's checkpoint is named as that, not as
    missing layers."""
    try:
        if (bad := checkpoint.verify(ckpt, ())) is not None:
            return bad
        state = _compatible(cfg, ckpt, ranges)
        return checkpoint.verify(ckpt, reads(state), files=lead)
    except OSError as e:  # an item that cannot be read at all
        return f"cannot read '{e.filename}': {e.strerror or e}"


def find_checkpoint(cfg: Config, resume: str | None, comm: Any, reads: Callable[[dict[str, Any]], list[str]],
                    log: Callable[[str], None] | None = None,
                    ranges: list[list[int]] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Collective over `comm`: the checkpoint `resume` names (a path, or `auto`: the newest intact one in
    train.checkpoint_dir) and its state; None to start afresh. Each rank verifies what it will read
    (`reads(state)`, see rank_reads); a damaged file anywhere skips that checkpoint for all ranks
    (`auto`, with a message that `log`, given on one rank, prints) or refuses it (a path)."""
    if not resume:
        return None
    if resume == "auto":
        if not cfg.train.checkpoint_dir:
            raise ConfigError("--resume auto looks in train.checkpoint_dir, which is not set")
        candidates = [d for _, d in reversed(checkpoint.committed(cfg.train.checkpoint_dir))]
        if not candidates:
            return None
    else:
        candidates = [agree(comm, lambda: checkpoint.resolve(resume))]
    lead, skipped = comm.Get_rank() == 0, []
    for ckpt in candidates:
        local = agree(comm, partial(_damage, cfg, ckpt, reads, lead, ranges))
        found = [(r, bad) for r, bad in enumerate(comm.allgather(local)) if bad is not None]
        if not found:
            return ckpt, checkpoint.read_state(ckpt)
        rank, bad = found[0]
        what = f"checkpoint '{ckpt}' is damaged or incomplete: {bad} (found by rank {rank})"
        if resume != "auto":
            raise ConfigError(f"{what}: resume from another checkpoint (--resume auto takes the newest intact one)")
        skipped.append(what)
        if log is not None:
            log(f"resume: {what}; taking the previous checkpoint")
    raise ConfigError(f"--resume auto: none of the {len(candidates)} checkpoint(s) in "
                      f"'{cfg.train.checkpoint_dir}' is intact (newest: {skipped[0]}): restore them, or move them "
                      f"away to start afresh")


# What each rank's DiLoCo state (flat outer parameters, momentum, residues) and each replica's own
# parameters depend on: a resume must keep all of them.
_DILOCO_LAYOUT = ("pp", "dp", "virtual_stages", "schedule", "dp_mode", "diloco_exchange", "grad_codec",
                  "diloco_inner_steps", "diloco_stagger")


def check_dp_layout(cfg: Config, state: dict[str, Any], ckpt: Path, ranges: list[list[int]] | None) -> None:
    """A checkpoint whose replicas differ (DiLoCo) resumes only into the same layout; one whose replicas
    are equal resumes into any (error-feedback residues then start afresh, see RunHooks.restore)."""
    if not state.get("dp", {}).get("per_replica"):
        return
    saved = state["config"]["parallel"]
    now = cfg.parallel
    diff = [f"parallel.{k} {getattr(now, k)} (checkpoint: {saved.get(k)})" for k in _DILOCO_LAYOUT
            if saved.get(k) != getattr(now, k)]
    if ranges is not None and [list(r) for r in state["partition"]] != [list(r) for r in ranges]:
        diff.append(f"layers per chunk {[list(r) for r in ranges]} (checkpoint: {state['partition']})")
    if diff:
        raise ConfigError(
            f"checkpoint '{ckpt}' holds {saved['dp']} DiLoCo replicas that train apart (each its own parameters, "
            f"AdamW state and outer-step state), which resume only into the same layout; this run differs in "
            f"{'; '.join(diff)}: resume with the checkpoint's settings, or start afresh")


class RunHooks:
    def __init__(self, cfg: Config, topo: Topology, schedule: Schedule, partition: Partition,
                 programs: dict[int, StageProgram], transport: Transport, dp: DataParallel,
                 log: Callable[[str], None], scaler: LossScaler | None = None, stateful: list[Any] | None = None):
        self.cfg, self.topo, self.programs, self.dp = cfg, topo, programs, dp
        self.scaler = scaler
        self.stateful = list(stateful or [])
        self.specs = {c: partition.stage(c) for c in programs}
        self.partition, self.log = partition, log
        self.reporter = topo.rank == 0
        self.start_step = 0
        self.val_losses: dict[int, float] = {}
        self.evaluator: Evaluator | None = None
        if cfg.train.eval_every:
            with ACTIVITY.waiting("set-up (opening the validation data)", long=True):
                val = agree(topo.world, lambda: self._val_source())
            self.evaluator = Evaluator(cfg, topo, schedule, programs, transport, val, eval_batch_count(cfg, val))
        self.saved: tuple[int, Path | None] = (-1, None)  # the last checkpoint this run committed
        self.files: dict[str, Path] = {}
        if cfg.data.source == "tokens":
            tokenizer = resolve_token_files(cfg.data).tokenizer
            if tokenizer is not None and tokenizer.is_file():
                self.files[checkpoint.TOKENIZER_FILE] = tokenizer

    def _val_source(self) -> Any:
        val = make_val_source(self.cfg.data, self.cfg.model)
        if val is None:
            raise ConfigError("train.eval_every is set but there is no validation data: set data.val_path, "
                              "or point data.path at a directory from `jaxpipe prepare-data` with val.bin")
        return val

    # -- resume --------------------------------------------------------------------------------------
    def restore(self, params: dict[int, Params], opt_state: Any, resume: str | None,
                found: tuple[Path, dict[str, Any]] | None) -> tuple[dict[int, Params], Any, int]:
        """(parameters, optimizer state, completed steps): from `found`, what `find_checkpoint`
        returned for `resume` (verified moments ago), if anything."""
        if not resume:
            return params, opt_state, 0
        if found is None:
            if self.reporter:
                self.log(f"resume: no checkpoint in {self.cfg.train.checkpoint_dir} yet, starting at step 0")
            return params, opt_state, 0
        ckpt, state = found
        per_replica = bool(state.get("dp", {}).get("per_replica")) and self.dp.per_replica_params
        subdir = replica_dir(self.topo.replica) if per_replica else ""
        with ACTIVITY.waiting("set-up (loading the checkpoint)", long=True):
            params, opt_state = agree(self.topo.world, lambda: checkpoint.load_rank(
                ckpt, self.cfg.model, self.specs, params, opt_state, verify_first=False, subdir=subdir))
        note = self._restore_dp(ckpt)
        notes = [n for n in self.topo.world.allgather(note) if n]
        if self.scaler is not None:
            self.scaler.load_state(state.get("loss_scale"))
        for part in self.stateful:
            note = part.load_extra_state(lambda name: checkpoint.read_extra(ckpt, name))
            if note:
                self.log(f"resume (rank {self.topo.rank}): {note}")
        if self.reporter:
            scale = f", loss scale {self.scaler.scale:g}" if self.scaler is not None and self.scaler.dynamic else ""
            self.log(f"resumed from {ckpt} after step {state['step']} "
                     f"(written with layers per chunk {[b - a for a, b in state['partition']]}{scale})")
            if notes:
                self.log(f"resume: {notes[0]}" + (f" (and on {len(notes) - 1} more ranks)" if len(notes) > 1 else ""))
        self.start_step = int(state["step"])
        return params, opt_state, self.start_step

    def _replica_dir(self) -> str:
        return replica_dir(self.topo.replica)

    def _dp_file(self) -> str:
        return dp_file(self.topo.stage, self.topo.replica)

    def _dp_signature(self) -> str:
        return json.dumps({**self.dp.signature(), "chunks": {str(c): [s.start, s.stop] for c, s in self.specs.items()}},
                          sort_keys=True)

    def _restore_dp(self, ckpt: Path) -> str | None:
        """Gives the DP algorithm its saved state; what could not be restored, said (None: all of it)."""
        saved = checkpoint.read_arrays(ckpt, self._dp_file())
        mine = self._dp_signature()
        if saved is not None and str(saved.pop("signature", "")) == mine:
            self.dp.load_state(saved)
            return None
        if self.dp.per_replica_params:  # A DiLoCo start from a checkpoint of equal replicas.
            return ("DiLoCo's outer parameters start from the checkpoint's parameters and its momentum at zero "
                    "(the checkpoint holds no outer-step state for this layout)")
        if self.cfg.parallel.grad_codec != "none":
            return ("error-feedback residues start at zero: the checkpoint holds none for this layout "
                    f"({self.dp.describe()}), so at most one quantisation step of each element is not carried over")
        return None

    # -- per step ------------------------------------------------------------------------------------
    def acts_after(self, step: int) -> bool:
        """Whether `after_step(step)` evaluates or saves (both collective)."""
        t = self.cfg.train
        return bool((self.evaluator is not None and step % t.eval_every == 0) or
                    (t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.steps)))

    def after_step(self, step: int, params: dict[int, Params], opt_state: Any, metrics_file: TextIO | None) -> None:
        """`step` counts completed steps (1-based), as the log does."""
        t = self.cfg.train
        if self.evaluator is not None and step % t.eval_every == 0:
            # The first evaluation compiles its programs along the pipeline: the long deadline.
            TRACE.phase("evaluation")
            with ACTIVITY.phase("the evaluation after the step", long=not self.val_losses):
                loss = self.evaluator(params, step)
            TRACE.phase(None)
            self.val_losses[step] = loss
            if self.reporter:
                self.log(f"eval {step:>5} | val loss {loss:.4f} | val ppl {perplexity(loss):.2f} | "
                         f"{self.evaluator.n_batches * t.global_batch_size} samples")
            if metrics_file is not None:
                metrics_file.write(json.dumps({"step": step, "val_loss": loss, "val_ppl": perplexity(loss)}) + "\n")
                metrics_file.flush()
        if t.checkpoint_every and (step % t.checkpoint_every == 0 or step == t.steps):
            self.save(step, params, opt_state)

    def save(self, step: int, params: dict[int, Params], opt_state: Any) -> Path | None:
        """Collective: the checkpoint of `step`; on a failed save CheckpointError (train.on_save_error=stop,
        on every rank) or None after a warning (warn)."""
        t = self.cfg.train
        assert t.checkpoint_dir is not None
        per_replica = self.dp.per_replica_params
        dp_state = self.dp.state()
        arrays = {self._dp_file(): {**dp_state, "signature": np.array(self._dp_signature())}} if dp_state else None
        TRACE.phase("checkpoint save")
        try:
            with ACTIVITY.waiting("the checkpoint save after the step (its collectives wait for every writer)",
                                  long=True):
                path = checkpoint.save(
                    t.checkpoint_dir, step, comm=self.topo.world, writer=self.topo.replica == 0 or per_replica,
                    model=self.cfg.model, specs=self.specs, params=params, opt_state=opt_state,
                    state=self._state(step), files=self.files, keep=t.keep_checkpoints,
                    subdir=self._replica_dir() if per_replica else "", arrays=arrays, scalars=self.topo.stage == 0,
                    extras={k: v for part in self.stateful for k, v in part.extra_state().items()},
                )
        except CheckpointError as e:
            TRACE.phase(None)
            if t.on_save_error == "stop":
                raise CheckpointError(
                    f"{e}; train.on_save_error=stop ends the run: free space or restore write access to "
                    f"'{t.checkpoint_dir}', then resume with --resume auto (or set train.on_save_error=warn to "
                    f"train on without checkpoints)") from None
            if self.reporter:
                self.log(f"warning: {e}; training goes on without it (train.on_save_error=warn)")
            return None
        TRACE.phase(None)
        self.saved = (step, path)
        if self.reporter:
            self.log(f"checkpoint {path}")
        return path

    def stop_preempted(self, step: int, params: dict[int, Params], opt_state: Any) -> NoReturn:
        """Collective, at the step boundary where every rank learned of a SIGTERM/SIGINT (see
        jaxpipe.runtime.preempt): the checkpoint of `step` (unless the step's own just went out), the
        log line, then Preempted."""
        t = self.cfg.train
        path = None
        if t.checkpoint_dir:
            path = self.saved[1] if self.saved[0] == step else self.save(step, params, opt_state)
        with ACTIVITY.waiting("the exchange of preemption notices"):
            notices = self.topo.world.allgather((PREEMPT.signum, PREEMPT.wall_time) if PREEMPT.requested else None)
        signalled = [(r, n) for r, n in enumerate(notices) if n is not None]
        names = sorted({signal.Signals(signum).name for _, (signum, _) in signalled})
        ranks = ", ".join(str(r) for r, _ in signalled)
        took = time.time() - min(t for _, (_, t) in signalled)
        saved = (f"checkpoint {path} committed" if path is not None else
                 "no checkpoint (train.checkpoint_dir is not set)" if not t.checkpoint_dir else
                 "no checkpoint (its save failed, see above)")
        message = (f"preempted: {'/'.join(names)} on rank{'s' * (len(signalled) > 1)} {ranks}; every rank stopped "
                   f"after step {step}, {saved}; {took:.1f} s from the signal to the exit; exit status 75 "
                   f"(`jaxpipe supervise` resumes it with --resume auto)")
        if self.reporter:
            self.log(message)
        raise Preempted(message, step, None if path is None else str(path))

    def _state(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "samples_seen": step * cfg.train.global_batch_size,  # the data position: sample index of the next step
            "seed": cfg.train.seed,
            "data_seed": cfg.data.seed,
            "partition": [list(r) for r in self.partition.ranges],
            "tokenizer": checkpoint.TOKENIZER_FILE if self.files else None,
            # The scale the next step uses and the good steps towards its growth (the same on every rank).
            "loss_scale": self.scaler.state() if self.scaler is not None else None,
            "config": cfg.to_dict(),
            "dp": {"per_replica": self.dp.per_replica_params, "algorithm": self.dp.describe()},
        }
