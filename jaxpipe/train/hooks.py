"""What a real training run adds around the step loop: resume, evaluation and checkpoints.

Kept out of the trainer so its loop stays about steps: the trainer calls `restore` once after
initialising parameters and optimizer state, and `after_step` after every optimizer update. Both
are collective over the world communicator, like a step.

Exact resume needs nothing but the step: parameters and optimizer state (moments and update
counter, hence the learning-rate schedule) come from the checkpoint, the data stream is addressed
by step (`jaxpipe.data.source`), and initialisation is the only use of the seed. A resumed run therefore
computes bit-for-bit what the uninterrupted run computes, given the same partition and hardware.
State beyond that (`stateful`: objects with `extra_state()` -> {name: array} and
`load_extra_state(get)`, e.g. the tied embedding's int8 error feedback and delta mode's activation
copies) is saved by the rank that holds it and handed back to it on resume.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from jaxpipe.comm.topology import Topology
from jaxpipe.comm.transport import Transport
from jaxpipe.config import Config
from jaxpipe.data.source import make_val_source, resolve_token_files
from jaxpipe.dp.base import DataParallel
from jaxpipe.errors import ConfigError, agree
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.partition import Partition
from jaxpipe.pipeline.schedule import Schedule
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime.watchdog import ACTIVITY
from jaxpipe.train import checkpoint
from jaxpipe.train.evaluate import Evaluator, eval_batch_count, perplexity


def find_resume(resume: str, cfg: Config) -> Path | None:
    """`auto`: the newest checkpoint in train.checkpoint_dir, or None to start afresh; else a path."""
    if resume == "auto":
        if not cfg.train.checkpoint_dir:
            raise ConfigError("--resume auto looks in train.checkpoint_dir, which is not set")
        return checkpoint.latest(cfg.train.checkpoint_dir)
    return checkpoint.resolve(resume)


def check_resume(cfg: Config, resume: str | None) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint `resume` names and its state, checked against this run's model and batch;
    None to start afresh. Cheap (state.json only), so the trainer runs it before anything compiles."""
    if not resume or (ckpt := find_resume(resume, cfg)) is None:
        return None
    state = checkpoint.read_state(ckpt)
    checkpoint.check_compatible(state, cfg.model, ckpt)
    saved = state["config"]["train"]["global_batch_size"]
    if saved != cfg.train.global_batch_size:
        raise ConfigError(f"checkpoint '{ckpt}' was trained with train.global_batch_size {saved}, this run "
                          f"uses {cfg.train.global_batch_size}: the data position would not carry over")
    return ckpt, state


class RunHooks:
    def __init__(self, cfg: Config, topo: Topology, schedule: Schedule, partition: Partition,
                 programs: dict[int, StageProgram], transport: Transport, dp: DataParallel,
                 log: Callable[[str], None], stateful: list[Any] | None = None):
        self.cfg, self.topo, self.programs, self.dp = cfg, topo, programs, dp
        self.stateful = list(stateful or [])
        self.specs = {c: partition.stage(c) for c in programs}
        self.partition, self.log = partition, log
        self.reporter = topo.rank == 0
        self.start_step = 0
        self.val_losses: dict[int, float] = {}
        self.evaluator: Evaluator | None = None
        if cfg.train.eval_every:
            val = agree(topo.world, lambda: self._val_source())
            self.evaluator = Evaluator(cfg, topo, schedule, programs, transport, val, eval_batch_count(cfg, val))
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
                found: tuple[Path, dict[str, Any]] | None = None) -> tuple[dict[int, Params], Any, int]:
        """(parameters, optimizer state, completed steps): from the checkpoint `resume` names, if any.
        `found` is what `check_resume` returned, where the caller checked early."""
        if not resume:
            return params, opt_state, 0
        if found is None:
            found = agree(self.topo.world, lambda: check_resume(self.cfg, resume))
        if found is None:
            if self.reporter:
                self.log(f"resume: no checkpoint in {self.cfg.train.checkpoint_dir} yet, starting at step 0")
            return params, opt_state, 0
        ckpt, state = found
        params, opt_state = agree(self.topo.world, lambda: checkpoint.load_rank(
            ckpt, self.cfg.model, self.specs, params, opt_state))
        for part in self.stateful:
            note = part.load_extra_state(lambda name: checkpoint.read_extra(ckpt, name))
            if note:
                self.log(f"resume (rank {self.topo.rank}): {note}")
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
            assert t.checkpoint_dir is not None
            with ACTIVITY.waiting("the checkpoint save after the step (its barriers wait for every writer)", long=True):
                path = checkpoint.save(
                    t.checkpoint_dir, step, comm=self.topo.world, writer=self.topo.replica == 0,
                    model=self.cfg.model, specs=self.specs, params=params, opt_state=opt_state,
                    state=self._state(step), files=self.files, keep=t.keep_checkpoints,
                    extras={k: v for part in self.stateful for k, v in part.extra_state().items()},
                )
            if self.reporter:
                self.log(f"checkpoint {path}")

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
