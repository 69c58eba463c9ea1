"""Single-process training of the whole model, written without any jaxpipe pipeline code: the
ground truth that every pipeline/data-parallel layout must reproduce."""

from __future__ import annotations

import jax
import jax.numpy as jnp
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


def _stage_masks(params, stage_layers: list[range]) -> list:
    """Per stage, a tree of booleans over `params` (scanned or unrolled blocks): which elements that
    stage's outer step owns. The tied `wte` belongs to the first stage, `ln_f` to the last."""
    n_stages = len(stage_layers)

    def mask(s: int):
        def leaf(path, x):
            top = str(getattr(path[0], "key", path[0]))
            if top in ("wte", "wpe"):
                return np.full(x.shape, s == 0)
            if top == "ln_f":
                return np.full(x.shape, s == n_stages - 1)
            if top == "blocks":  # stacked [n_layer, ...]
                rows = np.isin(np.arange(x.shape[0]), list(stage_layers[s]))
                return np.broadcast_to(rows.reshape(-1, *([1] * (x.ndim - 1))), x.shape)
            return np.full(x.shape, int(top.split("_")[1]) in stage_layers[s])  # block_<i>
        return jax.tree_util.tree_map_with_path(leaf, params)
    return [mask(s) for s in range(n_stages)]


def reference_diloco(cfg: Config, stage_layers: list[range]) -> tuple[list[float], list[float],
                                                                       list[dict[str, np.ndarray]]]:
    """DiLoCo in one process, without pipeline or DP code: D replicas, each its own AdamW (with its own
    clipping) on its own share of every global batch; after step k stage s (its layers, `stage_layers[s]`)
    runs the outer step if (k + offset_s) % H == 0 or k is the last step, offset_s = s·H // P with
    `parallel.diloco_stagger`: g = mean of (outer - local), m = mu·m + g, outer += -lr·(g + mu·m), and
    every replica continues from outer. Returns the mean loss over replicas and replica 0's gradient
    norm per step, and every replica's final parameters (per layer)."""
    m, p = cfg.model, cfg.parallel
    D, H, P = p.dp, p.diloco_inner_steps, len(stage_layers)
    lr, mu = jnp.float32(p.diloco_outer_lr), jnp.float32(p.diloco_outer_momentum)
    layers = range(m.n_layer)
    init = init_stage_params(m, cfg.train.seed, layers, True, True)
    model = StageModel(m, n_layers=m.n_layer, first=True, last=True)
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), make_adamw(cfg.train))
    replicas = [init] * D
    states = [tx.init(init)] * D
    outer, momentum = init, jax.tree.map(jnp.zeros_like, init)
    masks = _stage_masks(init, stage_layers)
    offsets = [(s * H) // P if p.diloco_stagger else 0 for s in range(P)]
    source = make_source(cfg.data, m)
    B = cfg.train.global_batch_size // D

    @jax.jit
    def step_fn(params, opt_state, inputs, targets):
        loss, grads = jax.value_and_grad(lambda q: next_token_loss(model.apply({"params": q}, inputs), targets))(
            params)
        norm = optax.tree.norm(grads)
        updates, new_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), new_state, loss, norm

    losses, norms = [], []
    for step in range(cfg.train.steps):
        inputs, targets = global_batch(source, cfg, step)
        out = [step_fn(replicas[r], states[r], inputs[r * B:(r + 1) * B], targets[r * B:(r + 1) * B])
               for r in range(D)]
        replicas, states = [o[0] for o in out], [o[1] for o in out]
        losses.append(float(np.mean([float(o[2]) for o in out])))
        norms.append(float(out[0][3]))
        k = step + 1
        for s in range(P):
            if (k + offsets[s]) % H and k != cfg.train.steps:
                continue
            pseudo = [jax.tree.map(lambda a, b: a - b, outer, q) for q in replicas]
            total = pseudo[0]
            for q in pseudo[1:]:
                total = jax.tree.map(lambda a, b: a + b, total, q)
            g = jax.tree.map(lambda t: t / jnp.float32(D), total)
            new_m = jax.tree.map(lambda mm, gg: mu * mm + gg, momentum, g)
            new_outer = jax.tree.map(lambda o, gg, mm: o + (-lr * (gg + mu * mm)), outer, g, new_m)
            pick = lambda new, old, s=s: jax.tree.map(lambda msk, a, b: jnp.where(msk, a, b), masks[s], new, old)  # noqa: E731
            momentum, outer = pick(new_m, momentum), pick(new_outer, outer)
            replicas = [pick(outer, q) for q in replicas]
    flats = [{k: np.asarray(v) for k, v in flatten_per_layer(m, layers, True, True, q).items()} for q in replicas]
    return losses, norms, flats
