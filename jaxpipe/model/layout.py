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
from jaxpipe.model.gpt import Block, Params, compute_dtype

_EMBED_KEY, _POS_KEY, _LAYER_KEY0 = 0, 1, 2


def _root_key(seed: int) -> jax.Array:
    return jax.random.PRNGKey(seed)


@functools.cache
def _jitted_inits(cfg_key: tuple[Any, ...]) -> tuple[Any, Any]:
    """One compiled initialiser per model shape, for layers and embeddings: run eagerly, a layer's
    initialisation dispatches hundreds of tiny programs (seconds per stage on CPU)."""
    cfg = ModelConfig(**dict(cfg_key))
    x = jnp.zeros((1, 1, cfg.d_model), compute_dtype(cfg))
    init = nn.initializers.normal(cfg.init_std)
    layer = jax.jit(lambda key: Block(cfg).init(key, x)["params"])
    embedding = jax.jit(lambda k_te, k_pe: {"wte": init(k_te, (cfg.vocab_size, cfg.d_model)),
                                             "wpe": init(k_pe, (cfg.seq_len, cfg.d_model))})
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
    return {"scale": jnp.ones((cfg.d_model,), jnp.float32), "bias": jnp.zeros((cfg.d_model,), jnp.float32)}


def assemble_stage_params(
    cfg: ModelConfig,
    layers: list[Params],
    *,
    embedding: Params | None,
    final_ln: Params | None,
    wte: jax.Array | None,
) -> Params:
    """Builds a StageModel parameter tree from per-layer pieces (stacked when blocks are scanned)."""
    params: Params = {}
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
    emb = init_embedding(cfg, seed) if (first or last) else None
    return assemble_stage_params(
        cfg,
        [init_layer(cfg, seed, i) for i in layers],
        embedding=emb if first else None,
        final_ln=init_final_ln(cfg) if last else None,
        wte=emb["wte"] if (last and emb is not None) else None,
    )


def layer_param_count(cfg: ModelConfig) -> int:
    """One transformer layer: qkv, proj, fc and out weights and biases, two LayerNorms."""
    return 12 * cfg.d_model**2 + 13 * cfg.d_model


def stage_param_counts(cfg: ModelConfig, ranges: Sequence[tuple[int, int]]) -> list[int]:
    """Parameters each stage (or chunk) of a partition holds, counting the last stage's copy of the
    tied `wte` (it is stored and updated there too) unless the first stage is also the last."""
    d, v, s = cfg.d_model, cfg.vocab_size, cfg.seq_len
    counts = []
    for i, (a, b) in enumerate(ranges):
        n = (b - a) * layer_param_count(cfg)
        if i == 0:
            n += v * d + s * d
        if i == len(ranges) - 1:
            n += 2 * d + (v * d if len(ranges) > 1 else 0)
        counts.append(n)
    return counts


def param_count(cfg: ModelConfig) -> int:
    """The model's parameters (the tied embedding once)."""
    return stage_param_counts(cfg, [(0, cfg.n_layer)])[0]


def flatten_per_layer(
    cfg: ModelConfig, layers: range, first: bool, last: bool, params: Params
) -> dict[str, Any]:
    """A stage's parameters keyed by global layer, independent of partition and scan/unroll:
    `embed/wte`, `embed/wpe`, `layer_{i}/<path>`, `head/ln_f/<path>`, `head/wte` (the tied copy)."""
    out: dict[str, Any] = {}

    def put(prefix: str, tree: Params) -> None:
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            out[prefix + "/".join(str(getattr(k, "key", k)) for k in path)] = leaf

    if first:
        put("embed/", {"wte": params["wte"], "wpe": params["wpe"]})
    for i, layer in zip(layers, split_stage_params(cfg, params, len(layers)), strict=True):
        put(f"layer_{i}/", layer)
    if last:
        put("head/", {"ln_f": params["ln_f"]})
        if not first:
            out["head/wte"] = params["wte"]
    return out
