"""Runs one rank's lowered actions for one step: the only place that turns a schedule into work.

Per action it fetches the input (tokens, a message, or a neighbouring chunk's value on this rank),
runs the chunk's program for the action's computation, and hands outputs to the transport or to
the next chunk. Receives are posted ahead (`lookahead` receives past the one the next action
needs), per peer in the order that peer sends them; sends complete in the background; JAX
dispatch is asynchronous; so the host thread stays ahead of the device and communication
overlaps compute. No per-micro-batch host synchronisation happens here except waiting for a
message that the next action truly needs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp

from jaxpipe.comm.message import ArraySpec, Kind, MsgKey
from jaxpipe.comm.transport import Transport
from jaxpipe.model.gpt import Params
from jaxpipe.pipeline.schedule import Lowered, Op
from jaxpipe.pipeline.stage import StageProgram
from jaxpipe.runtime import faults
from jaxpipe.runtime.trace import TRACE, message_label
from jaxpipe.runtime.watchdog import ACTIVITY


@dataclass
class StepBatch:
    """This rank's share of a step's data, by micro-batch: tokens where the first chunk lives,
    targets where the last one does (functions, so evaluation reads a batch only when it runs)."""

    inputs: Callable[[int], jax.Array] | None = None
    targets: Callable[[int], jax.Array] | None = None


@dataclass
class StepResult:
    grads: dict[int, Params]
    losses: list[jax.Array] = field(default_factory=list)  # per micro-batch, where the last chunk lives

    @property
    def mean_loss(self) -> jax.Array | None:
        return jnp.mean(jnp.stack(self.losses)) if self.losses else None


class Executor:
    """One rank's view of a lowered schedule: its chunks' programs and the transport."""

    def __init__(self, lowered: Lowered, rank: int, programs: dict[int, StageProgram], transport: Transport,
                 lookahead: int):
        self.lowered, self.rank, self.programs, self.transport = lowered, rank, programs, transport
        self.actions = lowered.ranks[rank]
        self.n_chunks = lowered.schedule.n_chunks
        self.n_microbatches = lowered.schedule.n_microbatches
        any_program = next(iter(programs.values()))
        self.spec: ArraySpec = any_program.act_spec  # activations and their gradients share it
        self._posts = self._plan_posts(lookahead)
        # What failure messages say each action is doing (a receive or send: the computation it
        # serves), formatted once here rather than per step.
        several = lowered.schedule.virtual_stages > 1
        compute = [i for i, a in enumerate(self.actions) if not a.op.is_comm]
        self._doing = []
        for i, a in enumerate(self.actions):
            if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                a = self.actions[next((j for j in compute if j > i), i)]
            elif a.op.is_comm:
                a = self.actions[max((j for j in compute if j < i), default=i)]
            self._doing.append(a.describe(chunk=several))
        # The trace's names of the messages the receives wait for (as `MsgKey.short`).
        self._labels = [message_label(*a.message()) if a.op in (Op.RECV_ACT, Op.RECV_GRAD) else ""
                        for a in self.actions]

    def _plan_posts(self, lookahead: int) -> list[list[tuple[int, tuple[Kind, int, int]]]]:
        """For each action, the receives to post before it: the next `lookahead` receives this rank
        will wait for, each with every message its peer sends before it (a transport completes one
        peer's messages in the order they were sent, so a receive is never posted behind one that
        is sent later)."""
        recvs = [i for i, a in enumerate(self.actions) if a.op in (Op.RECV_ACT, Op.RECV_GRAD)]
        order = {p: self.lowered.send_order(p, self.rank) for p in range(len(self.lowered.ranks)) if p != self.rank}
        posted = {p: 0 for p in order}
        done: set[tuple[int, tuple[Kind, int, int]]] = set()
        plan: list[list[tuple[int, tuple[Kind, int, int]]]] = [[] for _ in self.actions]
        k = 0
        for i in range(len(self.actions)):
            while k < len(recvs) and recvs[k] < i:
                k += 1
            for j in recvs[k:k + max(1, lookahead)]:
                a = self.actions[j]
                assert a.peer is not None
                want = a.message()
                while (a.peer, want) not in done:
                    message = order[a.peer][posted[a.peer]]
                    plan[i].append((a.peer, message))
                    done.add((a.peer, message))
                    posted[a.peer] += 1
        return plan

    def run(self, step: int, params: dict[int, Params], grads: dict[int, Params], batch: StepBatch,
            loss_scale: float = 1.0, profile: dict[tuple[int, Op], list[float]] | None = None) -> StepResult:
        """Runs the actions; returns the accumulated gradients (of `loss_scale` × the mean loss
        over micro-batches) and the last chunk's per-micro-batch losses. Evaluation (forward-only
        schedules) passes no gradients and gets losses only. With `profile`, every computation is
        waited for and its seconds appended under (chunk, op): for benchmarks, never in training."""
        scale = jnp.float32(loss_scale / self.n_microbatches)
        values: dict[tuple[Kind, int, int], jax.Array] = {}  # (kind, consuming chunk, micro-batch) -> array
        saved: dict[tuple[int, int], Any] = {}  # (chunk, micro-batch) -> what its backward needs
        weight_saved: dict[tuple[int, int], Any] = {}  # (chunk, micro-batch) -> what its W needs
        losses: list[jax.Array] = []
        last = self.n_chunks - 1
        transport = self.transport

        def key(message: tuple[Kind, int, int]) -> MsgKey:
            kind, chunk, mb = message
            return MsgKey(step, mb, kind, chunk)

        for i, a in enumerate(self.actions):
            for peer, message in self._posts[i]:
                transport.expect(key(message), peer, self.spec)
            ACTIVITY.doing = self._doing[i]  # For failure messages: one attribute store.
            if a.op in (Op.RECV_ACT, Op.RECV_GRAD):
                assert a.peer is not None
                if TRACE.enabled:
                    t_wait = time.perf_counter()
                values[a.message()] = transport.recv(key(a.message()), a.peer, self.spec)
                if TRACE.enabled:
                    TRACE.waited(step, self._labels[i], a.peer, t_wait)
                continue
            if a.op in (Op.SEND_ACT, Op.SEND_GRAD):
                assert a.peer is not None
                transport.send(key(a.message()), a.peer, values.pop(a.message()))
                continue
            if TRACE.enabled:
                t_task = time.perf_counter()
            if faults.ARMED:
                faults.at_task(step + 1, a.microbatch)
            c, m, prog = a.chunk, a.microbatch, self.programs[a.chunk]
            if profile is not None:
                jax.block_until_ready((grads, values))
                t0 = time.perf_counter()
            x = None
            if a.op in (Op.F, Op.L, Op.LI, Op.E, Op.EL):
                x = batch.inputs(m) if c == 0 else values.pop((Kind.ACT, c, m))  # type: ignore[misc]
            out_act = out_grad = None
            if a.op == Op.F:
                out_act, saved[(c, m)] = prog.forward(params[c], x)
            elif a.op == Op.B:
                grads[c], out_grad = prog.backward(grads[c], saved.pop((c, m)), values.pop((Kind.GRAD, c, m)))
            elif a.op == Op.I:
                out_grad, weight_saved[(c, m)] = prog.backward_input(saved.pop((c, m)), values.pop((Kind.GRAD, c, m)))
            elif a.op == Op.W:
                grads[c] = prog.backward_weight(grads[c], params[c], weight_saved.pop((c, m)))
            elif a.op == Op.L:
                grads[c], out_grad, loss = prog.forward_backward_loss(params[c], grads[c], x, batch.targets(m),  # type: ignore[misc]
                                                                      scale)
                losses.append(loss)
            elif a.op == Op.LI:
                out_grad, loss, weight_saved[(c, m)] = prog.forward_input_loss(params[c], x, batch.targets(m),  # type: ignore[misc]
                                                                               scale)
                losses.append(loss)
            elif a.op == Op.E:
                out_act = prog.eval_forward(params[c], x)
            elif a.op == Op.EL:
                losses.append(prog.eval_loss(params[c], x, batch.targets(m)))  # type: ignore[misc]
            if TRACE.enabled:  # The computation's end: its first output that the next program does not donate.
                out = out_act if out_act is not None else out_grad if out_grad is not None else (
                    losses[-1] if a.op in (Op.L, Op.LI, Op.EL) else weight_saved.get((c, m)))
                TRACE.computed(step, a.op.value, c, m, t_task, out, grads[c] if out is None else None)
            if profile is not None:
                jax.block_until_ready((grads, out_act, out_grad, losses, weight_saved, saved))
                profile.setdefault((c, a.op), []).append(time.perf_counter() - t0)
            if out_act is not None and c < last:
                values[(Kind.ACT, c + 1, m)] = out_act
            if out_grad is not None and c > 0:
                values[(Kind.GRAD, c - 1, m)] = out_grad

        with ACTIVITY.waiting("completing this step's sends"):
            transport.flush()
        return StepResult(grads, losses)
