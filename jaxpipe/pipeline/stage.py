"""A model chunk's compiled programs: one per computation of the schedule IR
(`jaxpipe.pipeline.schedule.Op`): forward, full backward, the split backward's input-gradient and
weight-gradient halves, the last chunk's fused forward + loss + backward (whole or input half), and
the forward-only programs of evaluation.

Backward uses the residuals that `jax.vjp` saved during the forward (returned out of the forward
program as a pytree and fed to the backward program), not recomputation: recomputing costs a
third more FLOPs per step, and memory is better traded per block with `model.remat=block`, which
keeps only block inputs. Gradients accumulate into a float32 buffer that each program donates,
so a step allocates no new gradient memory per micro-batch.

Split backward (`split=True`, for schedules with I and W actions): the forward also returns each
parametrised op's input (`jaxpipe.model.gpt.WEIGHT_INPUTS`) and differentiates with respect to the
chunk's input and zero perturbations at each op's output only, so its residuals serve the input
gradient (I), which yields the gradients at the op outputs; W then forms the weight gradients from
those and the recorded inputs, with no second forward.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any, cast

import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.comm.message import ArraySpec
from jaxpipe.config import ModelConfig
from jaxpipe.model.gpt import PERTURBATIONS, WEIGHT_INPUTS, Params, StageModel, compute_dtype, next_token_loss
from jaxpipe.pipeline.partition import StageSpec


def _tree_add(a: Params, b: Params) -> Params:
    return jax.tree.map(jnp.add, a, b)


class _Packer:
    """Carries a pytree of arrays between two programs as one flat buffer per dtype.

    A forward's `jax.vjp` residuals are a few hundred arrays for an unrolled stage, and every array a
    program returns or takes costs host time at dispatch (on GPU ~4.5 ms per task for a 7-layer GPT-3
    XL stage: the host, not the GPU, paced the pipeline at micro-batch 1 and 2). Packed inside the
    producing program and sliced back inside the consuming one, they cross as a handful of arrays. The
    layout is fixed when the producer is traced (always before the consumer: a backward follows its
    forward); trees of few leaves (scanned blocks) pass as they are.

    Off by default (MIN_LEAVES = 10**9): measured on one H200 (7-layer GPT-3 XL stage, BENCHMARKS.md),
    packing halves the forward's host dispatch (3.3 -> 1.5 ms) but the copies into and out of the
    buffers cost more device time than that (forward + backward 13.7 -> 20.0 ms at micro-batch 1), and
    the device, not the host, paces the task. Set MIN_LEAVES (e.g. 16) where the host is the bottleneck."""

    MIN_LEAVES = 10**9

    def __init__(self) -> None:
        self._layout: Any = None

    def pack(self, tree: Any) -> Any:
        leaves, treedef = jax.tree.flatten(tree)
        if len(leaves) < self.MIN_LEAVES:
            self._layout = None
            return tree
        groups: dict[str, list[int]] = {}
        for i, leaf in enumerate(leaves):
            groups.setdefault(jnp.dtype(leaf.dtype).name, []).append(i)
        self._layout = (treedef, len(leaves), [(idx, [leaves[i].shape for i in idx]) for idx in groups.values()])
        return tuple(jnp.concatenate([jnp.ravel(leaves[i]) for i in idx]) for idx in groups.values())

    def unpack(self, packed: Any) -> Any:
        if self._layout is None:
            return packed
        treedef, n, groups = self._layout
        leaves: list[Any] = [None] * n
        for (idx, shapes), buf in zip(groups, packed, strict=True):
            offset = 0
            for i, shape in zip(idx, shapes, strict=True):
                size = int(np.prod(shape))
                leaves[i] = buf[offset:offset + size].reshape(shape)
                offset += size
        return jax.tree.unflatten(treedef, leaves)


class StageProgram:
    """Owns the jitted programs of one stage; pure functions of (params, grads, inputs).

    With a `mesh` (several devices in this process) parameters and gradients are replicated and
    every micro-batch is split along its batch axis; XLA inserts the gradient all-reduce.
    """

    def __init__(self, cfg: ModelConfig, spec: StageSpec, micro_batch_size: int, mesh: Any = None,
                 split: bool = False):
        self.cfg = cfg
        self.spec = spec
        self.mesh = mesh
        self.split = split
        self._residuals, self._weight_state = _Packer(), _Packer()  # F -> B / I, and I / LI -> W
        self.module = StageModel(cfg, n_layers=spec.n_layers, first=spec.first, last=spec.last)
        self.act_spec = ArraySpec((micro_batch_size, cfg.seq_len, cfg.d_model), jnp.dtype(compute_dtype(cfg)).name)
        self.token_spec = ArraySpec((micro_batch_size, cfg.seq_len), "int32")
        # Input of this stage and output it sends on (None where the stage reads tokens / has the loss).
        self.in_spec = None if spec.first else self.act_spec
        self.out_spec = None if spec.last else self.act_spec

        self.forward: Callable[..., Any] = jax.jit(self._forward_split if split else self._forward)
        self.backward: Callable[..., Any] = jax.jit(self._backward, donate_argnums=(0,))
        self.backward_input: Callable[..., Any] = jax.jit(self._backward_input)
        self.backward_weight: Callable[..., Any] = jax.jit(self._backward_weight, donate_argnums=(0,))
        self.forward_backward_loss: Callable[..., Any] = jax.jit(self._forward_backward_loss, donate_argnums=(1,))
        self.forward_input_loss: Callable[..., Any] = jax.jit(self._forward_input_loss)
        self.eval_forward: Callable[..., Any] = jax.jit(self._apply)
        self.eval_loss: Callable[..., Any] = jax.jit(self._eval_loss)

    # -- shapes ------------------------------------------------------------------------------------
    def _shapes(self) -> dict[str, Any]:
        x = jax.ShapeDtypeStruct(self.token_spec.shape, jnp.int32) if self.spec.first else jax.ShapeDtypeStruct(
            self.act_spec.shape, self.act_spec.dtype)
        return jax.eval_shape(self.module.init, jax.random.PRNGKey(0), x)

    def param_shapes(self) -> Params:
        return self._shapes()["params"]

    def _zero_perturbations(self) -> Params:
        """Zeros at every parametrised op's output (inside a program: constants XLA folds away)."""
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), self._shapes()[PERTURBATIONS])

    def zero_grads(self, params: Params) -> Params:
        # The zeros depend on no input value, so jit leaves them uncommitted: commit them like the
        # accumulated gradients the programs return, or the first micro-batch compiles its own copy.
        return self.place_params(self._zero_grads(params))

    @partial(jax.jit, static_argnums=0)
    def _zero_grads(self, params: Params) -> Params:
        # zeros_like keeps the parameters' sharding (replicated over the mesh, if any).
        return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)

    # -- placement -----------------------------------------------------------------------------------
    def place_params(self, tree: Params) -> Params:
        """Committed to this process's device(s): the optimizer's outputs are, and a jitted program
        called first with uncommitted and then with committed arguments compiles twice (seconds
        for a GPT-3 XL stage, in the second step)."""
        if self.mesh is None:
            return jax.device_put(tree, self.devices[0])
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))

    def place_input(self, x: Any) -> jax.Array:
        """Activations or tokens of one micro-batch, split over the mesh's devices along the batch."""
        if self.mesh is None:
            return jax.device_put(x, self.devices[0])  # committed, like what the NCCL transport returns
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec("data")))

    @property
    def devices(self) -> list[Any]:
        return list(self.mesh.devices.flat) if self.mesh is not None else [jax.local_devices()[0]]

    # -- programs ----------------------------------------------------------------------------------
    def _apply(self, params: Params, x: jax.Array) -> jax.Array:
        return cast(jax.Array, self.module.apply({"params": params}, x))

    def _forward(self, params: Params, x: jax.Array) -> tuple[jax.Array, Any]:
        """Non-last stage: activations out plus the residuals its backward needs."""
        if self.spec.first:  # Tokens are not differentiable: only the parameters get a cotangent.
            y, vjp = jax.vjp(lambda p: self._apply(p, x), params)
        else:
            y, vjp = jax.vjp(self._apply, params, x)
        return y, self._residuals.pack(vjp)

    def _backward(self, grads: Params, saved: Any, g_y: jax.Array) -> tuple[Params, jax.Array | None]:
        vjp = self._residuals.unpack(saved)
        if self.spec.first:
            (g_params,) = vjp(g_y)
            return _tree_add(grads, g_params), None
        g_params, g_x = vjp(g_y)
        return _tree_add(grads, g_params), g_x

    def _forward_split(self, params: Params, x: jax.Array) -> tuple[jax.Array, Any]:
        """Non-last chunk, split backward: activations out, plus (I's residuals, W's inputs)."""

        def f(x_in: Any, pert: Params) -> tuple[jax.Array, Any]:
            return self.module.apply({"params": params, PERTURBATIONS: pert}, x_in, mutable=[WEIGHT_INPUTS])

        pert = self._zero_perturbations()
        if self.spec.first:
            y, vjp, state = jax.vjp(lambda pe: f(x, pe), pert, has_aux=True)
        else:
            y, vjp, state = jax.vjp(f, x, pert, has_aux=True)
        return y, self._residuals.pack((vjp, state[WEIGHT_INPUTS]))

    def _backward_input(self, saved: Any, g_y: jax.Array) -> tuple[jax.Array | None, Any]:
        """I: the input gradient (None on the first chunk) and what W needs."""
        vjp, inputs = self._residuals.unpack(saved)
        if self.spec.first:
            (g_ops,) = vjp(g_y)
            return None, self._weight_state.pack((inputs, g_ops))
        g_x, g_ops = vjp(g_y)
        return g_x, self._weight_state.pack((inputs, g_ops))

    def _backward_weight(self, grads: Params, params: Params, w: Any) -> Params:
        """W: the weight gradients, sum over ops of (d op / d params)^T · (gradient at the op's output)."""
        inputs, g_ops = self._weight_state.unpack(w)

        def pairing(p: Params) -> jax.Array:
            outs = self.module.apply({"params": p}, inputs, method=StageModel.weight_ops)
            return cast(jax.Array, sum(jnp.vdot(g.astype(jnp.float32), o.astype(jnp.float32))
                                       for g, o in zip(jax.tree.leaves(g_ops), jax.tree.leaves(outs), strict=True)))

        return _tree_add(grads, jax.grad(pairing)(params))

    def _forward_backward_loss(
        self, params: Params, grads: Params, x: jax.Array, targets: jax.Array, scale: jax.Array
    ) -> tuple[Params, jax.Array | None, jax.Array]:
        """Last chunk: loss of one micro-batch, its parameter gradients (accumulated) and input gradient.

        `scale` is loss scale / number of micro-batches, so the accumulated gradient is that of the
        (scaled) mean loss.
        """

        def loss_fn(p: Params, x_in: jax.Array) -> tuple[jax.Array, jax.Array]:
            loss = next_token_loss(self._apply(p, x_in), targets)
            return loss * scale, loss

        if self.spec.first:  # PP = 1: the whole model in one program.
            (_, loss), g_params = jax.value_and_grad(loss_fn, has_aux=True)(params, x)
            return _tree_add(grads, g_params), None, loss
        (_, loss), (g_params, g_x) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, x)
        return _tree_add(grads, g_params), g_x, loss

    def _forward_input_loss(self, params: Params, x: jax.Array, targets: jax.Array,
                            scale: jax.Array) -> tuple[jax.Array | None, jax.Array, Any]:
        """LI: the last chunk's loss and input gradient; its weight gradients wait for W."""

        def loss_fn(x_in: Any, pert: Params) -> tuple[jax.Array, Any]:
            logits, state = self.module.apply({"params": params, PERTURBATIONS: pert}, x_in,
                                              mutable=[WEIGHT_INPUTS])
            loss = next_token_loss(logits, targets)
            return loss * scale, (loss, state[WEIGHT_INPUTS])

        pert = self._zero_perturbations()
        if self.spec.first:
            g_ops, (loss, inputs) = jax.grad(lambda pe: loss_fn(x, pe), has_aux=True)(pert)
            return None, loss, self._weight_state.pack((inputs, g_ops))
        (g_x, g_ops), (loss, inputs) = jax.grad(loss_fn, argnums=(0, 1), has_aux=True)(x, pert)
        return g_x, loss, self._weight_state.pack((inputs, g_ops))

    def _eval_loss(self, params: Params, x: jax.Array, targets: jax.Array) -> jax.Array:
        return next_token_loss(self._apply(params, x), targets)

    # -- per-step reductions -------------------------------------------------------------------------
    @partial(jax.jit, static_argnums=(0, 2))
    def sq_norm(self, grads: Params, skip_tied_wte: bool) -> jax.Array:
        """Sum of squares of this stage's gradients; the last stage's tied `wte` copy is skipped
        (when it is not also the first stage) so the global norm counts that matrix once."""
        leaves = [v for k, v in grads.items() if not (skip_tied_wte and k == "wte")]
        return cast(jax.Array, sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(leaves)))
