"""The per-layer parameter layout, which is independent of the partition.

Parameters are initialised per layer from `fold_in(seed, layer)`, never per stage, so every
partition of the model starts from exactly the same numbers as the single-process model; a stage's
tree is assembled from per-layer pieces and flattened back into per-layer keys for checkpoints.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxpipe.config import ModelConfig
from jaxpipe.model.gpt import Params, block_type, compute_dtype

_EMBED_KEY, _POS_KEY, _LAYER_KEY0 = 0, 1, 2
_HEAD_KEY = 2**31 - 1  # the untied LM head's (past any layer's)


def _root_key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


@functools.cache
def _jitted_inits(cfg_key: tuple[Any, ...]) -> tuple[Any, Any]:
    """One compiled initialiser per model shape, for layers and embeddings: run eagerly, a layer's
    initialisation dispatches hundreds of tiny programs (seconds per stage on CPU)."""
    cfg = ModelConfig(**dict(cfg_key))
    x = jnp.zeros((1, 1, cfg.d_model), compute_dtype(cfg))
    init = nn.initializers.normal(cfg.init_std)
    layer = jax.jit(lambda key: block_type(cfg)(cfg).init(key, x)["params"])
    if cfg.arch == "gpt3":
        embedding = jax.jit(lambda k_te, k_pe: {"wte": init(k_te, (cfg.vocab_size, cfg.d_model)),
                                                 "wpe": init(k_pe, (cfg.seq_len, cfg.d_model))})
    else:  # no learned positions
        embedding = jax.jit(lambda k_te, k_pe: {"wte": init(k_te, (cfg.vocab_size, cfg.d_model))})
    return layer, embedding


def _inits(cfg: ModelConfig) -> tuple[Any, Any]:
    return _jitted_inits(tuple(sorted(dataclasses.asdict(cfg).items())))


def init_layer(cfg: ModelConfig, seed: int, layer: int) -> Params:
    """Parameters of transformer layer `layer` (global index): the same for every partition."""
    return _inits(cfg)[0](jax.random.fold_in(_root_key(seed), _LAYER_KEY0 + layer))


def init_embedding(cfg: ModelConfig, seed: int) -> Params:
    root = _root_key(seed)
    return _inits(cfg)[1](jax.random.fold_in(root, _EMBED_KEY), jax.random.fold_in(root, _POS_KEY))


def init_final_ln(cfg: ModelConfig) -> Params:
    if cfg.arch == "llama":  # RMSNorm: a scale only
        return {"scale": jnp.ones((cfg.d_model,), jnp.float32)}
    return {"scale": jnp.ones((cfg.d_model,), jnp.float32), "bias": jnp.zeros((cfg.d_model,), jnp.float32)}


def init_lm_head(cfg: ModelConfig, seed: int) -> jax.Array:
    """The untied LM head [V, D] (model.tie_embeddings off)."""
    key = jax.random.fold_in(_root_key(seed), _HEAD_KEY)
    return jax.jit(lambda k: nn.initializers.normal(cfg.init_std)(k, (cfg.vocab_size, cfg.d_model)))(key)


def assemble_stage_params(
    cfg: ModelConfig,
    layers: list[Params],
    *,
    embedding: Params | None,
    final_ln: Params | None,
    wte: jax.Array | None,
    lm_head: jax.Array | None = None,
) -> Params:
    """Builds a StageModel parameter tree from per-layer pieces (stacked when blocks are scanned)."""
    params: Params = {}
    if lm_head is not None:
        params["lm_head"] = lm_head
    if embedding is not None:
        params.update(embedding)
    elif wte is not None:
        params["wte"] = wte
    if layers:
        if cfg.scan_blocks:
            params["blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
        else:
            params.update({f"block_{j}": p for j, p in enumerate(layers)})
    if final_ln is not None:
        params["ln_f"] = final_ln
    return params


def split_stage_params(cfg: ModelConfig, params: Params, n_layers: int) -> list[Params]:
    """The inverse of `assemble_stage_params` for the blocks: one tree per layer, in order."""
    if n_layers == 0:
        return []
    if cfg.scan_blocks:
        return [jax.tree.map(lambda x, j=j: x[j], params["blocks"]) for j in range(n_layers)]
    return [params[f"block_{j}"] for j in range(n_layers)]


def init_stage_params(cfg: ModelConfig, seed: int, layers: range, first: bool, last: bool) -> Params:
    tied = cfg.tie_embeddings
    emb = init_embedding(cfg, seed) if (first or (last and tied)) else None
    return assemble_stage_params(
        cfg,
        [init_layer(cfg, seed, i) for i in layers],
        embedding=emb if first else None,
        final_ln=init_final_ln(cfg) if last else None,
        wte=emb["wte"] if (last and tied and emb is not None) else None,
        lm_head=init_lm_head(cfg, seed) if (last and not tied) else None,
    )


def layer_param_count(cfg: ModelConfig) -> int:
    """One transformer layer: gpt3's qkv, proj, fc and out weights and biases and two LayerNorms;
    llama's q, kv, proj, gate_up and down weights and two RMSNorm scales."""
    d, f = cfg.d_model, cfg.ffn_dim
    if cfg.arch == "llama":
        d_kv = cfg.kv_heads * (d // cfg.n_head)
        return 2 * d * d + 2 * d * d_kv + 3 * d * f + 2 * d
    return 4 * d * d + 2 * d * f + 9 * d + f


def stage_param_counts(cfg: ModelConfig, ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Parameters each stage (or chunk) of a partition holds, counting the last stage's copy of the
    tied `wte` (it is stored and updated there too) unless the first stage is also the last, or the
    untied head's own matrix (a separate V×D on the last stage at any PP)."""
    d, v, s = cfg.d_model, cfg.vocab_size, cfg.seq_len
    counts = []
    for i, (a, b) in enumerate(ranges):
        n = (b - a) * layer_param_count(cfg)
        if i == 0:
            n += v * d + (s * d if cfg.arch == "gpt3" else 0)
        if i == len(ranges) - 1:
            norm = 2 * d if cfg.arch == "gpt3" else d
            n += norm + (v * d if (len(ranges) > 1 or not cfg.tie_embeddings) else 0)
        counts.append(n)
    return counts



def param_count(cfg: ModelConfig) -> int:
    """The model's parameters (the tied embedding once; an untied head counts as its own matrix)."""
    return stage_param_counts(cfg, [(0, cfg.n_layer)])[0]


def flatten_per_layer(
    cfg: ModelConfig, layers: range, first: bool, last: bool, params: Params
) -> dict[str, Any]:
    """A stage's parameters keyed by global layer, independent of partition and scan/unroll:
    `embed/wte`, `embed/wpe`, `layer_{i}/<path>`, `head/ln_f/<path>`, `head/wte` (the tied copy),
    `head/lm_head` (an untied head)."""
    out: dict[str, Any] = {}

    def put(prefix: str, tree: Params) -> None:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + "/".join(str(getattr(k, "key", k)) for k in path)] = leaf

    if first:
        put("embed/", {k: params[k] for k in ("wte", "wpe") if k in params})
    for i, layer in zip(layers, split_stage_params(cfg, params, len(layers)), strict=True):
        put(f"layer_{i}/", layer)
    if last:
        put("head/", {"ln_f": params["ln_f"]})
        if "lm_head" in params:
            out["head/lm_head"] = params["lm_head"]
        elif not first:
            out["head/wte"] = params["wte"]
    return out
