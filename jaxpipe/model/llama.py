"""The LLaMA-family transformer block (`model.arch: llama`): RMSNorm, SwiGLU MLP, rotary positions
with a configurable θ (and Llama 3.1's frequency scaling), grouped-query attention, no biases.

It plugs into `jaxpipe.model.gpt.StageModel` in place of the GPT-3 block, with the same contract
(a `(x, None)` pair in and out, every parametrised op recorded for the split backward), so every
schedule, codec, partition and checkpoint path is the GPT's. The numerics follow Hugging Face's
`LlamaForCausalLM` (tests/test_hf_import.py compares logits): RoPE's angles in float32 in the
"rotate half" convention of its checkpoints, RMSNorm statistics in float32, query head i attending
with key/value head i // (n_head / n_kv_head).

Parameter layout per layer (Flax; `jaxpipe.export.hf` maps it to and from Hugging Face's):

    ln_1/scale [d]            input_layernorm
    q/kernel [d, n_head, h]   q_proj
    kv/kernel [d, 2, n_kv, h] k_proj | v_proj (one matmul)
    proj/kernel [n_head, h, d] o_proj
    ln_2/scale [d]            post_attention_layernorm
    gate_up/kernel [d, 2, f]  gate_proj | up_proj (one matmul)
    down/kernel [f, d]        down_proj
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpipe.config import ModelConfig

LLAMA_OPS = ("ln_1", "q", "kv", "proj", "ln_2", "gate_up", "down")


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """The rotation frequencies per channel pair (float32), as Hugging Face computes them: θ^(-2i/h),
    and with `rope_scaling: llama3` long wavelengths slowed by `rope_factor`, smoothly between the
    low- and high-frequency wavelengths (transformers' `_compute_llama3_parameters`)."""
    h = cfg.d_model // cfg.n_head
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, h, 2, dtype=np.float32) / np.float32(h)))).astype(
        np.float32)
    if cfg.rope_scaling == "none":
        return inv
    factor, lo, hi = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_len
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old / lo, inv / factor, inv)
    smooth = (old / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def apply_rope(x_BxLxNxH: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotates each head's channel pairs (i, i + h/2) by position × frequency ("rotate half")."""
    pos = jnp.arange(x_BxLxNxH.shape[1], dtype=jnp.float32)
    angles_LxH2 = pos[:, None] * jnp.asarray(inv_freq)[None, :]
    angles_LxH = jnp.concatenate([angles_LxH2, angles_LxH2], axis=-1)
    cos, sin = (f(angles_LxH)[None, :, None, :].astype(x_BxLxNxH.dtype) for f in (jnp.cos, jnp.sin))
    half = x_BxLxNxH.shape[-1] // 2
    rotated = jnp.concatenate([-x_BxLxNxH[..., half:], x_BxLxNxH[..., :half]], axis=-1)
    return x_BxLxNxH * cos + rotated * sin


class LlamaBlock(nn.Module):
    """Pre-norm block: x + attn(RMSNorm(x)), then x + down(silu(gate(h)) * up(h)) with h = RMSNorm(x)."""

    cfg: ModelConfig

    def setup(self) -> None:
        from jaxpipe.model.gpt import block_setup

        cfg = self.cfg
        dtype, n_head, d_head, init, out_init = block_setup(cfg)
        self.ln_1 = nn.RMSNorm(epsilon=cfg.ln_eps, dtype=dtype)
        self.q = nn.DenseGeneral((n_head, d_head), use_bias=False, dtype=dtype, kernel_init=init)
        self.kv = nn.DenseGeneral((2, cfg.kv_heads, d_head), use_bias=False, dtype=dtype, kernel_init=init)
        self.proj = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, kernel_init=out_init)
        self.ln_2 = nn.RMSNorm(epsilon=cfg.ln_eps, dtype=dtype)
        self.gate_up = nn.DenseGeneral((2, cfg.ffn_dim), use_bias=False, dtype=dtype, kernel_init=init)
        self.down = nn.Dense(cfg.d_model, use_bias=False, dtype=dtype, kernel_init=out_init)

    def _op(self, name: str, x: jax.Array) -> jax.Array:
        from jaxpipe.model.gpt import PERTURBATIONS, WEIGHT_INPUTS

        self.sow(WEIGHT_INPUTS, name + "_in", x)
        return self.perturb(name + "_out", getattr(self, name)(x), collection=PERTURBATIONS)

    def __call__(self, x_BxLxD: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        from jaxpipe.model.gpt import _attention_impl, causal_attention

        inv_freq = rope_inv_freq(self.cfg)
        h_BxLxD = self._op("ln_1", x_BxLxD)
        q_BxLxNxH = apply_rope(self._op("q", h_BxLxD), inv_freq)
        kv_BxLx2xKxH = self._op("kv", h_BxLxD)
        k_BxLxKxH = apply_rope(kv_BxLx2xKxH[:, :, 0], inv_freq)
        o_BxLxNxH = causal_attention(q_BxLxNxH, k_BxLxKxH, kv_BxLx2xKxH[:, :, 1], _attention_impl(self.cfg))
        x_BxLxD = x_BxLxD + self._op("proj", o_BxLxNxH)
        gu_BxLx2xF = self._op("gate_up", self._op("ln_2", x_BxLxD))
        h_BxLxF = nn.silu(gu_BxLx2xF[:, :, 0]) * gu_BxLx2xF[:, :, 1]
        return x_BxLxD + self._op("down", h_BxLxF), None

    def weight_ops(self, _: Any, inputs: dict[str, Any]) -> tuple[None, dict[str, jax.Array]]:
        return None, {name + "_out": getattr(self, name)(inputs[name + "_in"][0]) for name in LLAMA_OPS}
