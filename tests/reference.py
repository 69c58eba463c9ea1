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


def _scaled_step(model: StageModel, tx: optax.GradientTransformation):
    """One AdamW step on the whole model: the gradient of the loss times `scale`, divided by it (float16's
    loss scaling; scale 1 otherwise); returns (parameters, optimizer state, loss, gradient norm)."""

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

    return step_fn


def reference_train(cfg: Config, skip: frozenset[int] = frozenset(), record: dict | None = None,
                    init: dict | None = None
                    ) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """`init`: the whole model's starting parameters (fine-tuning), else the seed's.

    `skip`: steps (0-based) whose update never happens: parameters, Adam moments and the update
    counter (hence the learning-rate schedule) stay as they were; the next step reads its own data.

    Dynamic loss scaling (float16, or `train.loss_scaling=dynamic`), as the config describes it: the
    gradient is that of the loss times the scale, divided by the scale; a step whose gradients are
    not finite is skipped (as are the steps in `skip`) and halves the scale (not below 1);
    `train.loss_scale_window` finite steps in a row double it. `record`, if given, receives the
    steps skipped ("skipped") and the scale each step used ("scales")."""
    m = cfg.model
    layers = range(m.n_layer)
    params = init if init is not None else init_stage_params(m, cfg.train.seed, layers, True, True)
    model = StageModel(m, n_layers=m.n_layer, first=True, last=True)
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), make_adamw(cfg.train))
    opt_state = tx.init(params)
    source = make_source(cfg.data, m)

    t = cfg.train
    dynamic = t.loss_scaling == "dynamic" or (t.loss_scaling == "auto" and compute_dtype(m) == jnp.float16)
    scale, good = (float(t.loss_scale_init) if dynamic else 1.0), 0

    step_fn = _scaled_step(model, tx)

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


def _stage_masks(params, stage_layers: list[range]) -> list:
    """Per stage, a tree of booleans over `params` (scanned or unrolled blocks): which elements that
    stage's outer step owns. The tied `wte` belongs to the first stage, `ln_f` to the last."""
    n_stages = len(stage_layers)

    def mask(s: int):
        def leaf(path, x):
            top = str(getattr(path[0], "key", path[0]))
            if top in ("wte", "wpe"):
                return np.full(x.shape, s == 0)
            if top in ("ln_f", "lm_head"):  # (lm_head: an untied LLaMA's head)
                return np.full(x.shape, s == n_stages - 1)
            if top == "blocks":  # stacked [n_layer, ...]
                rows = np.isin(np.arange(x.shape[0]), list(stage_layers[s]))
                return np.broadcast_to(rows.reshape(-1, *([1] * (x.ndim - 1))), x.shape)
            return np.full(x.shape, int(top.split("_")[1]) in stage_layers[s])  # block_<i>
        return jax.tree_util.tree_map_with_path(leaf, params)
    return [mask(s) for s in range(n_stages)]


def _fragment_masks(params, n_fragments: int) -> list:
    """Per fragment, a tree of booleans: layer l is in fragment l % F; embeddings and ln_f in fragment 0."""
    def mask(f: int):
        def leaf(path, x):
            top = str(getattr(path[0], "key", path[0]))
            if top == "blocks":
                rows = (np.arange(x.shape[0]) % n_fragments) == f
                return np.broadcast_to(rows.reshape(-1, *([1] * (x.ndim - 1))), x.shape)
            if top.startswith("block_"):
                return np.full(x.shape, int(top.split("_")[1]) % n_fragments == f)
            return np.full(x.shape, f == 0)
        return jax.tree_util.tree_map_with_path(leaf, params)
    return [mask(f) for f in range(n_fragments)]


class _Streaming:
    """Streaming DiLoCo's outer steps, as jaxpipe.dp.streaming's docstring states them: fragment f (layers
    l % F == f) starts after steps k with (k + f·H // F) % H == 0 (not the last step) from the replicas'
    parameters then; its outer Nesterov step merges after step k + tau: local <- a·local + (1 - a)·outer
    (float32, element by element); after the last step everything in flight merges, then every fragment
    takes one more outer step and every replica is replaced by it."""

    def __init__(self, cfg: Config, init):
        p = cfg.parallel
        self.D, self.H, self.F, self.tau = p.dp, p.diloco_inner_steps, p.diloco_fragments, p.diloco_overlap_steps
        self.alpha, self.steps = np.float32(p.diloco_merge_alpha), cfg.train.steps
        self.lr, self.mu = jnp.float32(p.diloco_outer_lr), jnp.float32(p.diloco_outer_momentum)
        self.masks = _fragment_masks(init, self.F)
        self.pending: dict[int, tuple[int, object, object]] = {}

    def _outer_step(self, f, replicas, outer, momentum):
        pseudo = [jax.tree.map(lambda a, b: a - b, outer, q) for q in replicas]
        total = pseudo[0]
        for q in pseudo[1:]:
            total = jax.tree.map(lambda a, b: a + b, total, q)
        g = jax.tree.map(lambda t: t / jnp.float32(self.D), total)
        new_m = jax.tree.map(lambda mm, gg: self.mu * mm + gg, momentum, g)
        new_outer = jax.tree.map(lambda o, gg, mm: o + (-self.lr * (gg + self.mu * mm)), outer, g, new_m)
        return new_outer, new_m

    def _pick(self, f, new, old):
        return jax.tree.map(lambda msk, a, b: jnp.where(msk, a, b), self.masks[f], new, old)

    def _merge(self, f, replicas, outer, alpha):
        a = np.float32(alpha)
        merged = [jax.tree.map(lambda q, o: jnp.asarray((np.asarray(q) * a + np.asarray(o) * (np.float32(1) - a))
                                                        .astype(np.float32)), q, outer) for q in replicas]
        return [self._pick(f, m, q) for m, q in zip(merged, replicas, strict=True)]

    def after(self, k, replicas, outer, momentum):
        last = k == self.steps
        for f in sorted(self.pending):
            at, new_outer, new_m = self.pending[f]
            if at == k or last:
                del self.pending[f]
                outer, momentum = self._pick(f, new_outer, outer), self._pick(f, new_m, momentum)
                replicas = self._merge(f, replicas, outer, self.alpha)
        if last:
            for f in range(self.F):
                new_outer, new_m = self._outer_step(f, replicas, outer, momentum)
                outer, momentum = self._pick(f, new_outer, outer), self._pick(f, new_m, momentum)
                replicas = [self._pick(f, outer, q) for q in replicas]
            return replicas, outer, momentum
        for f in range(self.F):
            if (k + (f * self.H) // self.F) % self.H == 0:
                new_outer, new_m = self._outer_step(f, replicas, outer, momentum)
                self.pending[f] = (k + self.tau, new_outer, new_m)
        return replicas, outer, momentum


def reference_diloco(cfg: Config, stage_layers: list[range], skip: dict[int, frozenset[int]] | None = None,
                     record: dict | None = None) -> tuple[list[float], list[float], list[dict[str, np.ndarray]]]:
    """DiLoCo in one process, without pipeline or DP code: D replicas, each its own AdamW (with its own
    clipping) on its own share of every global batch; after step k stage s (its layers, `stage_layers[s]`)
    runs the outer step if (k + offset_s) % H == 0 or k is the last step, offset_s = s·H // P with
    `parallel.diloco_stagger`: g = mean of (outer - local), m = mu·m + g, outer += -lr·(g + mu·m), and
    every replica continues from outer. Returns the mean loss over replicas and replica 0's gradient
    norm per step, and every replica's final parameters (per layer).

    Dynamic loss scaling (float16) as in `reference_train`, but per replica: each replica skips its own
    non-finite steps (and those in `skip[replica]`) and keeps its own scale; `record` receives
    "skipped" and "scales" as lists per replica."""
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

    t = cfg.train
    dynamic = t.loss_scaling == "dynamic" or (t.loss_scaling == "auto" and compute_dtype(m) == jnp.float16)
    scale, good = [float(t.loss_scale_init) if dynamic else 1.0] * D, [0] * D
    skip = skip or {}
    skipped: list[list[int]] = [[] for _ in range(D)]
    scales: list[list[float]] = [[] for _ in range(D)]

    step_fn = _scaled_step(model, tx)
    streaming = p.dp_mode == "streaming_diloco"
    stream = _Streaming(cfg, init) if streaming else None

    losses, norms = [], []
    for step in range(cfg.train.steps):
        inputs, targets = global_batch(source, cfg, step)
        out = [step_fn(replicas[r], states[r], inputs[r * B:(r + 1) * B], targets[r * B:(r + 1) * B],
                       np.float32(scale[r])) for r in range(D)]
        for r, (new_params, new_state, loss, norm) in enumerate(out):
            scales[r].append(scale[r])
            finite = step not in skip.get(r, ()) and bool(np.isfinite(float(norm)) and np.isfinite(float(loss)))
            if finite:
                replicas[r], states[r] = new_params, new_state
            else:
                skipped[r].append(step)
            if dynamic and not finite:
                scale[r], good[r] = max(scale[r] / 2, 1.0), 0
            elif dynamic:
                good[r] += 1
                if good[r] == t.loss_scale_window:
                    scale[r], good[r] = scale[r] * 2, 0
        losses.append(float(np.mean([float(o[2]) for o in out])))
        norms.append(float(out[0][3]) if step not in skipped[0] else float("nan"))  # rank 0 reports replica 0
        k = step + 1
        if streaming:
            replicas, outer, momentum = stream.after(k, replicas, outer, momentum)
            continue
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
    if record is not None:
        record.update(skipped=skipped, scales=scales)
    flats = [{k: np.asarray(v) for k, v in flatten_per_layer(m, layers, True, True, q).items()} for q in replicas]
    return losses, norms, flats
