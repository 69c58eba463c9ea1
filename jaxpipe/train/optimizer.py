"""AdamW with linear warm-up and cosine decay (optax), and clipping by the *global* gradient norm.

Clipping cannot be an optax transform here: the norm spans every stage of the pipeline, so each
stage computes its sum of squares, the pipeline sums them over MPI, and the jitted update gets
the global norm as an argument. The update donates parameters, optimizer state and gradients.
"""

from __future__ import annotations

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

    def _update(self, params: Params, opt_state: Any, grads: Params, global_norm: jax.Array,
                inv_loss_scale: jax.Array) -> tuple[Params, Any]:
        """`grads` are of the loss times the loss scale; `global_norm` is already unscaled."""
        grads = jax.tree.map(lambda g: g * inv_loss_scale, grads)
        grads = clip(grads, global_norm, self.train.grad_clip)
        updates, opt_state = self.tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


class LossScaler:
    """Dynamic loss scaling for float16 (halve and skip on overflow, double after a window of
    good steps). Host-side state: every rank sees the same finite/overflow verdict, because the
    verdict comes from the pipeline-wide gradient norm, so all ranks keep the same scale."""

    def __init__(self, train: TrainConfig, compute_dtype: Any):
        mode = train.loss_scaling
        self.dynamic = mode == "dynamic" or (mode == "auto" and jnp.dtype(compute_dtype) == jnp.float16)
        self.scale = float(train.loss_scale_init) if self.dynamic else 1.0
        self.window = train.loss_scale_window
        self._good = 0

    def update(self, finite: bool) -> None:
        if not self.dynamic:
            return
        if not finite:
            self.scale = max(self.scale / 2.0, 1.0)
            self._good = 0
            return
        self._good += 1
        if self._good >= self.window:
            self.scale *= 2.0
            self._good = 0
