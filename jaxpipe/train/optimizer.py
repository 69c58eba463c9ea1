"""AdamW with linear warm-up and cosine decay (optax), and clipping by the *global* gradient norm.

Clipping cannot be an optax transform here: the norm spans every stage of the pipeline, so each
stage computes its sum of squares, the pipeline sums them over MPI, and the jitted update gets
the global norm as an argument. The update donates parameters, optimizer state and gradients.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxpipe.config import TrainConfig, effective_warmup
from jaxpipe.model.gpt import Params

_NO_DECAY = {"bias", "scale"}  # LayerNorm parameters and biases are not decayed (GPT-3, nanoGPT).


def learning_rate(train: TrainConfig) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=train.lr,
        warmup_steps=effective_warmup(train),
        decay_steps=train.decay_steps or train.steps,
        end_value=train.min_lr,
    )


def decay_mask(params: Params) -> Any:
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) not in _NO_DECAY, params
    )


def make_adamw(train: TrainConfig) -> optax.GradientTransformation:
    """AdamW without clipping (see module doc); a single process chains `clip_by_global_norm` before it."""
    return optax.adamw(
        learning_rate(train), b1=train.beta1, b2=train.beta2, eps=train.eps,
        weight_decay=train.weight_decay, mask=decay_mask,
    )


def clip(grads: Params, global_norm: jax.Array, max_norm: float) -> Params:
    """Same arithmetic as optax.clip_by_global_norm, with the norm supplied from outside."""
    if max_norm <= 0:
        return grads
    trigger = global_norm < max_norm
    return jax.tree.map(lambda g: jax.lax.select(trigger, g, (g / global_norm.astype(g.dtype)) * max_norm), grads)


class Optimizer:
    def __init__(self, train: TrainConfig):
        self.train = train
        self.tx = make_adamw(train)
        self.schedule = learning_rate(train)
        self.update = jax.jit(self._update, donate_argnums=(0, 1))

    def init(self, params: Any) -> Any:
        return jax.jit(self.tx.init)(params)

    @staticmethod
    def applied_updates(opt_state: Any) -> int:
        """Updates applied so far: the schedule's position, which a skipped step does not advance."""
        return int(optax.tree_utils.tree_get_all_with_path(opt_state, "count")[0][1])

    def _update(self, params: Params, opt_state: Any, grads: Params, global_norm: jax.Array) -> tuple[Params, Any]:
        """`grads` are of the loss itself (a loss scale is already divided out, see `LossScaler.unscale`)."""
        grads = clip(grads, global_norm, self.train.grad_clip)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


@partial(jax.jit, donate_argnums=0)
def _times(grads: Any, factor: jax.Array) -> Any:
    return jax.tree.map(lambda g: g * factor, grads)


class LossScaler:
    """Dynamic loss scaling for float16 (halve and skip on overflow, double after a window of
    good steps). Host-side state: every rank sees the same finite/overflow verdict, because the
    verdict comes from the pipeline-wide gradient norm, so all ranks keep the same scale.

    The scale lives only between the loss and the float32 gradient buffers: `unscale` divides it
    out as soon as the pipeline has run, so the tied-embedding exchange, every data-parallel mode,
    the gradient norm and the optimizer see the gradients of the loss itself, whatever the compute
    dtype (a codec or error-feedback state never meets a scale that changes between steps). Scales
    are powers of two when `train.loss_scale_init` is one (the default 65536), and then scaling and
    unscaling are exact: only float16's range and underflow change, not the arithmetic.
    """

    def __init__(self, train: TrainConfig, compute_dtype: Any):
        mode = train.loss_scaling
        self.dynamic = mode == "dynamic" or (mode == "auto" and jnp.dtype(compute_dtype) == jnp.float16)
        self.scale = float(train.loss_scale_init) if self.dynamic else 1.0
        self.window = train.loss_scale_window
        self.good_steps = 0  # finite steps since the scale last changed

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self.good_steps = 0
            return
        self.good_steps += 1
        if self.good_steps >= self.window:
            self.scale *= 2.0
            self.good_steps = 0

    def unscale(self, grads: Any) -> Any:
        """`grads` (of the loss times `scale`, donated) divided by the scale; as they are without scaling."""
        return _times(grads, jnp.float32(1.0 / self.scale)) if self.scale != 1.0 else grads

    def state(self) -> dict[str, Any]:
        """For the checkpoint's state.json: a resumed float16 run continues with this scale and count."""
        return {"dynamic": self.dynamic, "scale": self.scale, "good_steps": self.good_steps}

    def load_state(self, state: dict[str, Any] | None) -> None:
        """Continues from a checkpoint's `state()`. A run that was not scaled dynamically (float32,
        bfloat16) or a checkpoint from before the scale was saved leaves this run's initial scale."""
        if self.dynamic and state is not None and state.get("dynamic"):
            self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
