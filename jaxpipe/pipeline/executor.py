"""Walks one stage's task list for one step: the only place that turns a schedule into work.

Per task it fetches the input (tokens, or a message from a neighbour), runs the stage program,
and hands the output to the transport. Receives are posted `lookahead` tasks ahead, sends
complete in the background, and JAX dispatch is asynchronous, so the host thread stays ahead of
the device and communication overlaps compute. No per-micro-batch host synchronisation happens
here except waiting for a message that the next task truly needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe.comm.message import Kind, MsgKey
from jaxpipe.comm.transport import Transport
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.schedule import Phase, Task
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime import faults
from jaxpipe.runtime.timeline import TIMELINE
from jaxpipe.runtime.watchdog import ACTIVITY


@dataclass
class StepBatch:
    """This stage's share of a step's data: tokens on the first stage, targets on the last."""

    inputs: Any | None  # int32 [M, mb, L] or None
    targets: Any | None  # int32 [M, mb, L] or None


def _incoming(task: Task, program: StageProgram) -> tuple[int, Kind] | None:
    """(peer stage, message kind) that `task` must receive before it can run, if any."""
    spec = program.spec
    if task.phase == Phase.FWD and not spec.first:
        return spec.index - 1, Kind.ACT
    if task.phase == Phase.BWD and not spec.last:
        return spec.index + 1, Kind.GRAD
    return None


def run_step(
    step: int,
    tasks: list[Task],
    program: StageProgram,
    transport: Transport,
    params: Params,
    grads: Params,
    batch: StepBatch,
    lookahead: int,
    loss_scale: float = 1.0,
) -> tuple[Params, jax.Array | None]:
    """Runs the tasks; returns the accumulated gradients and (last stage) the mean micro-batch loss.

    The gradients are those of `loss_scale` × the mean loss over micro-batches.
    """
    spec = program.spec
    n_micro = sum(1 for t in tasks if t.phase == Phase.FWD)
    scale = jnp.float32(loss_scale / n_micro)
    saved: dict[int, Any] = {}  # micro-batch -> vjp residuals of its forward (all but the last stage)
    losses: list[jax.Array] = []

    def post(i: int) -> None:
        if i < len(tasks) and (inc := _incoming(tasks[i], program)) is not None:
            peer, kind = inc
            transport.expect(MsgKey(step, tasks[i].microbatch, kind), peer, program.act_spec)

    for i in range(min(lookahead, len(tasks))):
        post(i)
    for i, task in enumerate(tasks):
        ACTIVITY.doing = task  # For failure messages: one attribute store, formatted only if read.
        TIMELINE.mark("task", task)
        if faults.ARMED:
            faults.at_task(step + 1, task.microbatch)
        post(i + lookahead)
        mb = task.microbatch
        inc = _incoming(task, program)
        received = None
        if inc:
            TIMELINE.mark("wait", task)
            received = transport.recv(MsgKey(step, mb, inc[1]), inc[0], program.act_spec)
            TIMELINE.mark("got", task)

        if task.phase == Phase.FWD:
            x = batch.inputs[mb] if spec.first else received
            if spec.last:  # Forward, loss and backward at once; the input gradient leaves right away.
                grads, g_x, loss = program.forward_backward_loss(params, grads, x, batch.targets[mb], scale)
                losses.append(loss)
                TIMELINE.mark("dispatched", task)
                if not spec.first:
                    transport.send(MsgKey(step, mb, Kind.GRAD), spec.index - 1, g_x)
            else:
                y, saved[mb] = program.forward(params, x)
                TIMELINE.mark("dispatched", task)
                transport.send(MsgKey(step, mb, Kind.ACT), spec.index + 1, y)
        elif not spec.last:  # The last stage's backward already ran with its forward.
            grads, g_x = program.backward(grads, saved.pop(mb), received)
            TIMELINE.mark("dispatched", task)
            if not spec.first:
                transport.send(MsgKey(step, mb, Kind.GRAD), spec.index - 1, g_x)

    with ACTIVITY.waiting("completing this step's sends"):
        transport.flush()
    mean_loss = jnp.mean(jnp.stack(losses)) if losses else None
    return grads, mean_loss
