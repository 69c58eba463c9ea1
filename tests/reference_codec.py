"""Single-process training of the whole model with compressed pipeline traffic applied where the
pipeline applies it, written without any jaxpipe pipeline code: the ground truth for
`parallel.act_codec`, `parallel.act_grad_codec`, `parallel.act_delta` and `tied_grad_dtype=int8`.

The model runs as its layer ranges (the pipeline's chunks, given explicitly) one after another; at
every boundary a `jax.custom_vjp` function stands for the message pair: forward, the activation is
replaced by what the receiver decodes (the quantise/dequantise round trip of
`jaxpipe.comm.quant`, or in delta mode the copy plus the round trip of the change, per micro-batch:
absolute int8 while any of its samples has no copy); backward, the gradient is replaced by its
round trip in the gradient codec. `int4_sr` rounds stochastically with the noise the pipeline draws
for the same message, derived here on its own from the documented recipe (train.seed, then the
replica, step, micro-batch within the replica, kind and receiving chunk folded in; evaluation to
nearest). The tied embedding keeps one copy per end, each end's gradient
rounded to int8 with its own error-feedback residue before the two are added.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxpipe.comm import quant
from jaxpipe.config import Config
from jaxpipe.data.source import make_source
from jaxpipe.model.gpt import StageModel, next_token_loss
from jaxpipe.model.layout import flatten_per_layer, init_stage_params
from jaxpipe.train.optimizer import make_adamw

F32 = jnp.float32


def _format(name: str, backward: bool, group: int) -> tuple[str, int]:
    """(quant format, values per scale; 0 = per row) of codec `name`."""
    return {"int8": ("int8", 0), "int4": ("int4", group), "int4_sr": ("int4", group), "int4_row": ("int4", 0),
            "float8": ("float8_e5m2" if backward else "float8_e4m3", 0)}[name]


def roundtrip(name: str, backward: bool, group: int = 32):
    """x -> what the far end decodes, for codec `name` (parallel.act_codec / act_grad_codec; int4's
    scale per `group` values of a row, parallel.act_int4_group), rounding to nearest (evaluation)."""
    if name == "none":
        return lambda x: x
    if name == "bfloat16":
        return lambda x: x.astype(jnp.bfloat16).astype(x.dtype)
    fmt, g = _format(name, backward, group)
    return lambda x: quant.roundtrip(x, fmt, g)


def _stochastic(x, ids, kind: int, chunk: int, group: int):
    """int4_sr's round trip of the messages of a whole batch `x`: micro-batch j's rows (ids[j] =
    seed, replica, step, micro-batch) with noise from that message's key."""
    xs = x.reshape(ids.shape[0], -1, *x.shape[1:])

    def one(xm, idm):
        k = jax.random.key(idm[0])
        for v in (idm[1], idm[2], idm[3], kind, chunk):
            k = jax.random.fold_in(k, v)
        return quant.roundtrip(xm, "int4", group, jax.random.uniform(k, xm.shape, F32))

    return jax.vmap(one)(xs, ids).reshape(x.shape)


def _boundary(act_rt, grad_rt, delta_fmt, chunk: int, act_sr: int = 0, grad_sr: int = 0):
    """The message pair between chunk `chunk` - 1 and `chunk`; `act_sr` / `grad_sr`: int4_sr's group
    in that direction (0: the round trip `act_rt` / `grad_rt`)."""
    @jax.custom_vjp
    def f(x, copy, first, ids):
        if act_sr:
            return _stochastic(x, ids, 0, chunk, act_sr)
        if delta_fmt is None:
            return act_rt(x)
        fmt, g = delta_fmt
        absolute = quant.roundtrip(x, "int8")
        change = quant.decode_rows(quant.encode_rows(x.astype(F32) - copy.astype(F32), fmt, g), fmt, F32, g)
        delta = quant.saturate(copy.astype(F32) + change, x.dtype)
        return jnp.where(first[:, None, None], absolute, delta)

    def fwd(x, copy, first, ids):
        return f(x, copy, first, ids), ids

    def bwd(ids, g):
        return (_stochastic(g, ids, 1, chunk - 1, grad_sr) if grad_sr else grad_rt(g)), None, None, None

    f.defvjp(fwd, bwd)
    return f


def _ef(g, residue):
    target = g + residue
    sent = quant.decode_rows(quant.encode_rows(target, "int8"), "int8")
    return sent, target - sent


def reference_train_codec(cfg: Config, ranges: Sequence[tuple[int, int]],
                          after_step: Callable[[int, list], None] | None = None
                          ) -> tuple[list[float], list[float], dict[str, np.ndarray]]:
    """(losses, gradient norms, per-layer parameters) as `tests/reference.py` returns them, with the
    codecs of `cfg.parallel` at the boundaries between `ranges`. `after_step(step, stage_params)` is
    called after every step (1-based; tools/codec_quality.py evaluates there)."""
    m, t, p = cfg.model, cfg.train, cfg.parallel
    n = len(ranges)
    mods = [StageModel(m, n_layers=b - a, first=a == 0, last=b == m.n_layer) for a, b in ranges]
    params = [init_stage_params(m, t.seed, range(a, b), a == 0, b == m.n_layer) for a, b in ranges]
    g = p.act_int4_group
    delta_fmt = _format(p.act_codec, False, g) if p.act_delta else None
    sr = {name: g if name == "int4_sr" else 0 for name in (p.act_codec, p.act_grad_codec)}
    boundaries = [_boundary(roundtrip(p.act_codec, False, g), roundtrip(p.act_grad_codec, True, g), delta_fmt,
                            i + 1, sr[p.act_codec], sr[p.act_grad_codec]) for i in range(n - 1)]
    int8_tied = p.tied_grad_dtype == "int8"
    bf16_tied = p.tied_grad_dtype == "bfloat16"
    tx = optax.chain(optax.clip_by_global_norm(t.grad_clip), make_adamw(t))

    def trainable(ps):  # the head's copy of `wte` follows the embedding's: it is not a parameter of its own
        return [*ps[:-1], {k: v for k, v in ps[-1].items() if k != "wte"}]

    opt_state = tx.init(trainable(params))
    source = make_source(cfg.data, m)
    shape = (cfg.train.global_batch_size, m.seq_len, m.d_model)

    def loss_fn(ps, inputs, targets, copies, first, ids):
        x, hats = inputs, []
        for i, (mod, sp) in enumerate(zip(mods, ps, strict=True)):
            x = mod.apply({"params": sp}, x)
            if i < n - 1:
                x = boundaries[i](x, copies[i], first, ids)
                hats.append(jax.lax.stop_gradient(x))
        return next_token_loss(x, targets), hats

    @jax.jit
    def step_fn(ps, opt_state, residues, inputs, targets, copies, first, ids):
        (loss, hats), grads = jax.value_and_grad(loss_fn, has_aux=True)(ps, inputs, targets, copies, first, ids)
        g_embed, g_head = grads[0]["wte"], grads[-1]["wte"]
        if int8_tied:
            s_embed, r_embed = _ef(g_embed, residues[0])
            s_head, r_head = _ef(g_head, residues[1])
            tied, residues = s_embed + s_head, (r_embed, r_head)
        elif bf16_tied:
            tied = g_embed.astype(jnp.bfloat16).astype(F32) + g_head.astype(jnp.bfloat16).astype(F32)
        else:
            tied = g_embed + g_head
        grads = trainable([{**grads[0], "wte": tied}, *grads[1:]])
        norm = optax.tree.norm(grads)
        updates, new_state = tx.update(grads, opt_state, trainable(ps))
        new = optax.apply_updates(trainable(ps), updates)
        new = [*new[:-1], {**new[-1], "wte": new[0]["wte"]}]
        return new, new_state, residues, loss, norm, hats

    residues = (jnp.zeros((m.vocab_size, m.d_model), F32),) * 2
    stores = [dict() for _ in range(n - 1)]  # per boundary: {(replica, window): copy}
    losses, norms = [], []
    for step in range(t.steps):
        idx = step * t.global_batch_size + np.arange(t.global_batch_size)
        windows = source.window_index(idx) if p.act_delta else idx
        assert len(set(windows.tolist())) == len(windows), "a window twice in one step: not modelled here"
        replica = np.arange(t.global_batch_size) // cfg.batch_per_replica
        first = np.zeros(t.global_batch_size, bool)
        mb = t.micro_batch_size
        for start in range(0, t.global_batch_size, mb):  # the pipeline decides per micro-batch
            rows = range(start, start + mb)
            first[start:start + mb] = not all((replica[r], windows[r]) in stores[0] for r in rows) if n > 1 else True
        copies = [np.stack([s.get((replica[r], windows[r]), np.zeros(shape[1:], np.float32))
                            for r in range(len(idx))]) for s in stores]
        samples = source.samples(idx)
        per_replica = cfg.batch_per_replica // mb  # micro-batches per replica
        ids = np.array([(t.seed, j // per_replica, step, j % per_replica)
                        for j in range(t.global_batch_size // mb)], np.uint32)
        params, opt_state, residues, loss, norm, hats = step_fn(params, opt_state, residues, samples[:, :-1],
                                                                samples[:, 1:], copies, jnp.asarray(first), ids)
        if p.act_delta:
            for s, h in zip(stores, hats, strict=True):
                h = np.asarray(h)
                for r in range(len(idx)):
                    s[(replica[r], windows[r])] = h[r]
        losses.append(float(loss))
        norms.append(float(norm))
        if after_step is not None:
            after_step(step + 1, params)
    flat = {}
    for (a, b), sp in zip(ranges, params, strict=True):
        flat.update(flatten_per_layer(m, range(a, b), a == 0, b == m.n_layer, sp))
    flat.pop("head/wte", None)
    return losses, norms, {k: np.asarray(v) for k, v in flat.items()}
