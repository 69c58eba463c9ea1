"""What a real training run adds around the step loop: resume, evaluation and checkpoints.

Kept out of the trainer so its loop stays about steps: the trainer calls `restore` once after
initialising parameters and optimizer state, and `after_step` after every optimizer update. Both
are collective over the world communicator, like a step.

Exact resume needs nothing but the step: parameters and optimizer state (moments and update
counter, hence the learning-rate schedule) come from the checkpoint, the data stream is addressed
by step (`jaxpipe.data.source`), and initialisation is the only use of the seed. A resumed run therefore
computes bit-for-bit what the uninterrupted run computes, given the same partition and hardware.

What a run resumes from is verified first (`find_checkpoint`: every rank checks the checksums of the
items it will read); `--resume auto` skips a damaged or incomplete newest checkpoint for the previous
one. A save that fails (`train.on_save_error`) and a preemption (`stop_preempted`) end here too.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn, TextIO

from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import Transport
from jaxpipe.config import Config
from jaxpipe.data.source import make_val_source, resolve_token_files
from jaxpipe.dp.base import DataParallel
from jaxpipe.errors import CheckpointError, ConfigError, Preempted, agree
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.partition import Partition
from jaxpipe.pipeline.schedule import Schedule
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime.preempt import PREEMPT
from jaxpipe.runtime.watchdog import ACTIVITY
from jaxpipe.train import checkpoint
from jaxpipe.train.evaluate import Evaluator, eval_batch_count, perplexity


def _compatible(cfg: Config, ckpt: Path) -> dict[str, Any]:
    """The checkpoint's state, if it was written by a run of this model and global batch."""
    state = checkpoint.read_state(ckpt)
    checkpoint.check_compatible(state, cfg.model, ckpt)
    saved = state["config"]["train"]["global_batch_size"]
    if saved != cfg.train.global_batch_size:
        raise ConfigError(f"checkpoint '{ckpt}' was trained with train.global_batch_size {saved}, this run "
                          f"uses {cfg.train.global_batch_size}: the data position would not carry over")
    return state


def _damage(cfg: Config, ckpt: Path, names: list[str], lead: bool) -> str | None:
    """What is damaged in `ckpt` for a reader of `names` (None: intact); ConfigError if it is intact
    but not this run's. Checks state.json before the items, so another model's checkpoint is named as
    that, not as missing layers."""
    try:
        if (bad := checkpoint.verify(ckpt, ())) is not None:
            return bad
        _compatible(cfg, ckpt)
        return checkpoint.verify(ckpt, names, files=lead)
    except OSError as e:  # an item that cannot be read at all
        return f"cannot read '{e.filename}': {e.strerror or e}"


def find_checkpoint(cfg: Config, resume: str | None, comm: Any, names: list[str],
                    log: Callable[[str], None] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Collective over `comm`: the checkpoint `resume` names (a path, or `auto`: the newest intact one in
    train.checkpoint_dir) and its state; None to start afresh. Each rank verifies the items `names` it
    will read; a damaged one anywhere skips that checkpoint for all ranks (`auto`, with a message that
    `log`, given on one rank, prints) or refuses it (a path)."""
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
        local = agree(comm, lambda ckpt=ckpt: _damage(cfg, ckpt, names, lead))
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


class RunHooks:
    def __init__(self, cfg: Config, topo: Topology, schedule: Schedule, partition: Partition,
                 programs: dict[int, StageProgram], transport: Transport, dp: DataParallel,
                 log: Callable[[str], None]):
        self.cfg, self.topo, self.programs, self.dp = cfg, topo, programs, dp
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
        with ACTIVITY.waiting("set-up (loading the checkpoint)", long=True):
            params, opt_state = agree(self.topo.world, lambda: checkpoint.load_rank(
                ckpt, self.cfg.model, self.specs, params, opt_state, verify_first=False))
        if self.reporter:
            self.log(f"resumed from {ckpt} after step {state['step']} "
                     f"(written with layers per chunk {[b - a for a, b in state['partition']]})")
        self.start_step = int(state["step"])
        return params, opt_state, self.start_step

    # -- per step ------------------------------------------------------------------------------------
    def after_step(self, step: int, params: dict[int, Params], opt_state: Any, metrics_file: TextIO | None) -> None:
        """`step` counts completed steps (1-based), as the log does."""
        t = self.cfg.train
        if self.evaluator is not None and step % t.eval_every == 0:
            # The first evaluation compiles its programs along the pipeline: the long deadline.
            with ACTIVITY.phase("the evaluation after the step", long=not self.val_losses):
                loss = self.evaluator(params, step)
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
        try:
            with ACTIVITY.waiting("the checkpoint save after the step (its collectives wait for every writer)",
                                  long=True):
                path = checkpoint.save(
                    t.checkpoint_dir, step, comm=self.topo.world, writer=self.topo.replica == 0,
                    model=self.cfg.model, specs=self.specs, params=params, opt_state=opt_state,
                    state=self._state(step), files=self.files, keep=t.keep_checkpoints,
                )
        except CheckpointError as e:
            if t.on_save_error == "stop":
                raise CheckpointError(
                    f"{e}; train.on_save_error=stop ends the run: free space or restore write access to "
                    f"'{t.checkpoint_dir}', then resume with --resume auto (or set train.on_save_error=warn to "
                    f"train on without checkpoints)") from None
            if self.reporter:
                self.log(f"warning: {e}; training goes on without it (train.on_save_error=warn)")
            return None
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
            "config": cfg.to_dict(),
        }
