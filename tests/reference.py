"""Single-process training of the whole model, written without any jaxpipe pipeline code: the
ground truth that every pipeline/data-parallel layout must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe.config import Config
from jaxpipe.data.source import global_batch, make_source
from jaxpipe.model.gpt import StageModel, compute_dtype, next_token_loss
from jaxpipe.model.layout import flatten_per_layer, init_stage_params
from jaxpipe.train.optimizer import make_adamw


def reference_train(cfg: Config, skip: frozenset[int] = frozenset(), record: dict | None = None
                    ) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """`skip`: steps (0-based) whose update never happens: parameters, Adam moments and the update
    counter (hence the learning-rate schedule) stay as they were; the next step reads its own data.

    Dynamic loss scaling (float16, or `train.loss_scaling=dynamic`), as the config describes it: the
    gradient is that of the loss times the scale, divided by the scale; a step whose gradients are
    not finite is skipped (as are the steps in `skip`) and halves the scale (not below 1);
    `train.loss_scale_window` finite steps in a row double it. `record`, if given, receives the
    steps skipped ("skipped") and the scale each step used ("scales")."""
    m = cfg.model
    layers = range(m.n_layer)
    params = init_stage_params(m, cfg.train.seed, layers, True, True)
    model = StageModel(m, n_layers=m.n_layer, first=True, last=True)
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), make_adamw(cfg.train))
    opt_state = tx.init(params)
    source = make_source(cfg.data, m)

    t = cfg.train
    dynamic = t.loss_scaling == "dynamic" or (t.loss_scaling == "auto" and compute_dtype(m) == jnp.float16)
    scale, good = (float(t.loss_scale_init) if dynamic else 1.0), 0

    @jax.jit
    def step_fn(params, opt_state, inputs, targets, scale):
        def scaled_loss(p):
            loss = next_token_loss(model.apply({"params": p}, inputs), targets)
            return loss * scale, loss

        (_, loss), grads = jax.value_and_grad(scaled_loss, has_aux=True)(params)
        grads = jax.tree.map(lambda g: g / scale, grads)
        norm = optax.tree.norm(grads)
        updates, new_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, loss, norm

    losses, norms, skipped, scales = [], [], [], []
    for step in range(t.steps):
        inputs, targets = global_batch(source, cfg, step)
        new_params, new_state, loss, norm = step_fn(params, opt_state, inputs, targets, np.float32(scale))
        scales.append(scale)
        finite = step not in skip and bool(np.isfinite(float(norm)) and np.isfinite(float(loss)))
        if finite:
            params, opt_state = new_params, new_state
        else:
            skipped.append(step)
        if dynamic and not finite:
            scale, good = max(scale / 2, 1.0), 0
        elif dynamic:
            good += 1
            if good == t.loss_scale_window:
                scale, good = scale * 2, 0
        losses.append(float(loss))
        norms.append(float(norm) if finite else float("nan"))
    if record is not None:
        record.update(skipped=skipped, scales=scales)
    flat = flatten_per_layer(m, layers, True, True, params)
    return losses, norms, {k: np.asarray(v) for k, v in flat.items()}
