"""Single-process training of the whole model, written without any jaxpipe pipeline code: the
ground truth that every pipeline/data-parallel layout must reproduce."""

from __future__ import annotations

import jax
import numpy as np
import optax

from jaxpipe.config import Config
from jaxpipe.data.source import global_batch, make_source
from jaxpipe.model.gpt import StageModel, next_token_loss
from jaxpipe.model.layout import flatten_per_layer, init_stage_params
from jaxpipe.train.optimizer import make_adamw


def reference_train(cfg: Config, skip: frozenset[int] = frozenset()) -> tuple[list[float], list[float],
                                                                             dict[str, np.ndarray]]:
    """`skip`: steps (0-based) whose update never happens: parameters, Adam moments and the update
    counter (hence the learning-rate schedule) stay as they were; the next step reads its own data."""
    m = cfg.model
    layers = range(m.n_layer)
    params = init_stage_params(m, cfg.train.seed, layers, True, True)
    model = StageModel(m, n_layers=m.n_layer, first=True, last=True)
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), make_adamw(cfg.train))
    opt_state = tx.init(params)
    source = make_source(cfg.data, m)

    @jax.jit
    def step_fn(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(lambda p: next_token_loss(model.apply({"params": p}, inputs), targets))(
            params)
        norm = optax.tree.norm(grads)
        updates, new_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, loss, norm

    losses, norms = [], []
    for step in range(cfg.train.steps):
        inputs, targets = global_batch(source, cfg, step)
        new_params, new_state, loss, norm = step_fn(params, opt_state, inputs, targets)
        if step not in skip:
            params, opt_state = new_params, new_state
        losses.append(float(loss))
        norms.append(float(norm))
    flat = flatten_per_layer(m, layers, True, True, params)
    return losses, norms, {k: np.asarray(v) for k, v in flat.items()}
