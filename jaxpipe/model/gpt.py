"""Causal GPT-3 language model in Flax, written so that any contiguous slice of it is a pipeline stage.

A stage is `StageModel(first=..., last=..., n_layers=...)`: the first stage owns the token and
position embeddings, the last owns the final LayerNorm and the LM head, which is tied to the token
embedding (the last stage keeps its own copy of `wte`; the trainer sums the two copies' gradients
so both stay identical). The whole model is simply the stage that is both first and last.

How parameters are initialised and laid out per layer (so any partition starts identical and
checkpoints load into any other) is `jaxpipe.model.layout`.
Naming follows nanodo: `x_BxLxD` is batch × length × model width.
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxpipe.config import ModelConfig

Params = dict[str, Any]

def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    if cfg.dtype == "auto":
        return jnp.dtype(jnp.bfloat16 if jax.default_backend() == "gpu" else jnp.float32)
    return jnp.dtype(cfg.dtype)


def _attention_impl(cfg: ModelConfig) -> str:
    """cuDNN flash attention on GPU in half precision (~1.5x XLA's on H100), XLA elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    half = compute_dtype(cfg) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if (half and jax.default_backend() == "gpu") else "xla"


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    Takes and returns a `(x, None)` pair so the same class serves unrolled and under `nn.scan`.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxLxD: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        n_head, d_head = cfg.n_head, cfg.d_model // cfg.n_head
        init = nn.initializers.normal(cfg.init_std)
        # GPT-2/3 scale the residual projections by 1/sqrt(2 * n_layer) so depth does not grow the stream.
        out_init = nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layer))

        h_BxLxD = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_1")(x_BxLxD)
        qkv_BxLx3xNxH = nn.DenseGeneral((3, n_head, d_head), dtype=dtype, kernel_init=init, name="qkv")(h_BxLxD)
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
        o_BxLxNxH = jax.nn.dot_product_attention(
            q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True, implementation=_attention_impl(cfg)
        )
        o_BxLxD = nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), dtype=dtype, kernel_init=out_init, name="proj"
        )(o_BxLxNxH)
        x_BxLxD = x_BxLxD + o_BxLxD

        h_BxLxD = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_2")(x_BxLxD)
        h_BxLxF = nn.Dense(4 * cfg.d_model, dtype=dtype, kernel_init=init, name="fc")(h_BxLxD)
        h_BxLxF = nn.gelu(h_BxLxF, approximate=True)
        h_BxLxD = nn.Dense(cfg.d_model, dtype=dtype, kernel_init=out_init, name="out")(h_BxLxF)
        return x_BxLxD + h_BxLxD, None


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    if cfg.remat == "none":
        return Block
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
    return nn.remat(Block, prevent_cse=not cfg.scan_blocks, policy=policy)


class StageModel(nn.Module):
    """Layers [start, start + n_layers) of the GPT, plus embeddings if first and the head if last.

    Input: int32 tokens [B, L] on the first stage, activations [B, L, D] elsewhere.
    Output: float32 logits [B, L, V] on the last stage, activations [B, L, D] elsewhere.
    """

    cfg: ModelConfig
    n_layers: int
    first: bool
    last: bool

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = compute_dtype(cfg)
        init = nn.initializers.normal(cfg.init_std)
        wte_VxD = None
        if self.first or self.last:
            wte_VxD = self.param("wte", init, (cfg.vocab_size, cfg.d_model))
        if self.first:
            wpe_SxD = self.param("wpe", init, (cfg.seq_len, cfg.d_model))
            tokens_BxL = x
            x = (jnp.take(wte_VxD, tokens_BxL, axis=0) + wpe_SxD[: tokens_BxL.shape[1]]).astype(dtype)
        x_BxLxD = x.astype(dtype)

        block = _block_class(cfg)
        if self.n_layers:
            if cfg.scan_blocks:
                stack = nn.scan(
                    block, variable_axes={"params": 0}, split_rngs={"params": True}, length=self.n_layers
                )
                x_BxLxD, _ = stack(cfg, name="blocks")(x_BxLxD, None)
            else:
                for j in range(self.n_layers):
                    x_BxLxD, _ = block(cfg, name=f"block_{j}")(x_BxLxD)

        if not self.last:
            return x_BxLxD
        h_BxLxD = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype, name="ln_f")(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,vd->blv", h_BxLxD, wte_VxD.astype(dtype))
        return logits_BxLxV.astype(jnp.float32)


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over all positions (targets are inputs shifted by one)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()


def model_flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs (forward + backward, no recomputation) per trained token, LM head included:
    3 × (layers × (24·d² + 4·s·d) + 2·d·V). GPT-3 XL at seq 2048: 9.07 GFLOP per token."""
    d, s, v = cfg.d_model, cfg.seq_len, cfg.vocab_size
    return 3.0 * (cfg.n_layer * (24 * d * d + 4 * s * d) + 2 * d * v)
