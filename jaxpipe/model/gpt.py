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
from collections.abc import Mapping
from typing import Any, Literal

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


def block_setup(cfg: ModelConfig) -> tuple[jnp.dtype, int, int, Any, Any]:
    """What every block kind starts from: compute dtype, heads, head width, the weight initialiser and
    the residual projections' (GPT-2/3 scale them by 1/sqrt(2 * n_layer) so depth does not grow the
    stream; LLaMA's blocks keep the same rule)."""
    return (compute_dtype(cfg), cfg.n_head, cfg.d_model // cfg.n_head, nn.initializers.normal(cfg.init_std),
            nn.initializers.normal(cfg.init_std / math.sqrt(2 * cfg.n_layer)))


def _attention_impl(cfg: ModelConfig) -> Literal["xla", "cudnn"]:
    """cuDNN flash attention on GPU in half precision (~1.5x XLA's on H100), XLA elsewhere."""
    if cfg.attention != "auto":
        return cfg.attention
    half = compute_dtype(cfg) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    return "cudnn" if (half and jax.default_backend() == "gpu") else "xla"


def causal_attention(q_BxLxNxH: jax.Array, k_BxLxNxH: jax.Array, v_BxLxNxH: jax.Array,
                     implementation: Literal["xla", "cudnn"]) -> jax.Array:
    """`jax.nn.dot_product_attention(..., is_causal=True)`, except for float16 on CPU.

    JAX's XLA attention asks for the dot algorithm F16_F16_F32 (float16 inputs, float32
    accumulation and logits) for float16 queries; XLA's CPU backend has no such algorithm and fails
    at compile time. `_float32_logits_attention` computes the same thing with what CPU offers:
    a float16 product with float32 output and no named algorithm, which XLA's CPU compiler upcasts
    to a float32 product (float16 values and their pairwise products are exact in float32, so only
    the order of accumulation can differ). Every other case, and float16 on GPU, is JAX's own.
    """
    if q_BxLxNxH.dtype == jnp.float16 and implementation == "xla" and jax.default_backend() == "cpu":
        group = q_BxLxNxH.shape[2] // k_BxLxNxH.shape[2]  # grouped-query attention: head i reads kv head i // group
        if group > 1:
            k_BxLxNxH, v_BxLxNxH = (jnp.repeat(t, group, axis=2) for t in (k_BxLxNxH, v_BxLxNxH))
        return _float32_logits_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH)
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, is_causal=True,
                                        implementation=implementation)


def _float32_logits_attention(q_BxTxNxH: jax.Array, k_BxSxNxH: jax.Array, v_BxSxNxH: jax.Array) -> jax.Array:
    """JAX's XLA causal attention step for step (its `_dot_product_attention_core`: float32 logits,
    scale, mask with -0.7 x float32 max, float32 softmax, probabilities rounded to the value dtype, a
    product in that dtype), without the explicit dot algorithm. With float32 or bfloat16 inputs it
    gives JAX's forward bit for bit on CPU (tests/test_model.py)."""
    t, s, h = q_BxTxNxH.shape[1], k_BxSxNxH.shape[1], q_BxTxNxH.shape[-1]
    logits_BxNxTxS = jnp.einsum("BTNH,BSNH->BNTS", q_BxTxNxH, k_BxSxNxH, preferred_element_type=jnp.float32)
    logits_BxNxTxS *= jnp.float32(1.0 / math.sqrt(h))
    causal_TxS = jnp.tril(jnp.ones((t, s), dtype=bool))
    logits_BxNxTxS = jnp.where(causal_TxS, logits_BxNxTxS, jnp.float32(-0.7 * jnp.finfo(jnp.float32).max))
    probs_BxNxTxS = jax.nn.softmax(logits_BxNxTxS, axis=-1).astype(v_BxSxNxH.dtype)
    return jnp.einsum("BNTS,BSNH->BTNH", probs_BxNxTxS, v_BxSxNxH)


# Collections for the split backward (zero-bubble schedules): every parametrised op records its input
# in WEIGHT_INPUTS and marks its output with a zero perturbation, whose cotangent is the gradient at
# that output. The input-gradient half differentiates with respect to the input and the
# perturbations only; the weight-gradient half applies each op to its recorded input again and takes
# the parameter gradient of <output gradient, op(params, input)>, which is exactly the weight part
# of the backward (the op's forward matmul is dead code there and compiled away).
WEIGHT_INPUTS = "weight_inputs"
PERTURBATIONS = "perturbations"
BLOCK_OPS = ("ln_1", "qkv", "proj", "ln_2", "fc", "out")


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x)).

    Takes and returns a `(x, None)` pair so the same class serves unrolled and under `nn.scan`.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        dtype, n_head, d_head, init, out_init = block_setup(cfg)
        self.ln_1 = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype)
        self.qkv = nn.DenseGeneral((3, n_head, d_head), dtype=dtype, kernel_init=init)
        self.proj = nn.DenseGeneral(cfg.d_model, axis=(-2, -1), dtype=dtype, kernel_init=out_init)
        self.ln_2 = nn.LayerNorm(epsilon=cfg.ln_eps, dtype=dtype)
        self.fc = nn.Dense(cfg.ffn_dim, dtype=dtype, kernel_init=init)
        self.out = nn.Dense(cfg.d_model, dtype=dtype, kernel_init=out_init)

    def _op(self, name: str, x: jax.Array) -> jax.Array:
        self.sow(WEIGHT_INPUTS, name + "_in", x)
        return self.perturb(name + "_out", getattr(self, name)(x), collection=PERTURBATIONS)

    def __call__(self, x_BxLxD: jax.Array, _: Any = None) -> tuple[jax.Array, None]:
        h_BxLxD = self._op("ln_1", x_BxLxD)
        qkv_BxLx3xNxH = self._op("qkv", h_BxLxD)
        q_BxLxNxH, k_BxLxNxH, v_BxLxNxH = (qkv_BxLx3xNxH[:, :, i] for i in range(3))
        o_BxLxNxH = causal_attention(q_BxLxNxH, k_BxLxNxH, v_BxLxNxH, _attention_impl(self.cfg))
        x_BxLxD = x_BxLxD + self._op("proj", o_BxLxNxH)
        h_BxLxF = nn.gelu(self._op("fc", self._op("ln_2", x_BxLxD)), approximate=True)
        return x_BxLxD + self._op("out", h_BxLxF), None

    def weight_ops(self, _: Any, inputs: dict[str, Any]) -> tuple[None, dict[str, jax.Array]]:
        """Each parametrised op applied to its recorded input (`WEIGHT_INPUTS`), keyed like the
        perturbations; scanned like `__call__`."""
        return None, {name + "_out": getattr(self, name)(inputs[name + "_in"][0]) for name in BLOCK_OPS}


def block_type(cfg: ModelConfig) -> type[nn.Module]:
    """The transformer block of `model.arch` (jaxpipe.model.llama's for llama)."""
    if cfg.arch == "llama":
        from jaxpipe.model.llama import LlamaBlock

        return LlamaBlock
    return Block


def final_norm(cfg: ModelConfig) -> nn.Module:
    """The norm before the LM head: LayerNorm (gpt3) or RMSNorm (llama)."""
    if cfg.arch == "llama":
        return nn.RMSNorm(epsilon=cfg.ln_eps, dtype=compute_dtype(cfg))
    return nn.LayerNorm(epsilon=cfg.ln_eps, dtype=compute_dtype(cfg))


def _block_class(cfg: ModelConfig) -> type[nn.Module]:
    block = block_type(cfg)
    if cfg.remat == "none":
        return block
    policy = jax.checkpoint_policies.dots_with_no_batch_dims_saveable if cfg.remat == "dots" else None
    return nn.remat(block, prevent_cse=not cfg.scan_blocks, policy=policy)


class StageModel(nn.Module):
    """Layers [start, start + n_layers) of the GPT, plus embeddings if first and the head if last.

    The head is the tied `wte` (a copy on the last stage) or, with `model.tie_embeddings` off, its
    own matrix `lm_head` [V, D]; learned positions `wpe` are gpt3's only (llama rotates inside blocks).

    Input: int32 tokens [B, L] on the first stage, activations [B, L, D] elsewhere.
    Output: float32 logits [B, L, V] on the last stage, activations [B, L, D] elsewhere.
    """

    cfg: ModelConfig
    n_layers: int
    first: bool
    last: bool

    def setup(self) -> None:
        cfg = self.cfg
        init = nn.initializers.normal(cfg.init_std)
        if self.first or (self.last and cfg.tie_embeddings):
            self.wte = self.param("wte", init, (cfg.vocab_size, cfg.d_model))
        if self.first and cfg.arch == "gpt3":
            self.wpe = self.param("wpe", init, (cfg.seq_len, cfg.d_model))
        block = _block_class(cfg)
        if self.n_layers and cfg.scan_blocks:
            axes: Mapping[Any, int] = {"params": 0, WEIGHT_INPUTS: 0, PERTURBATIONS: 0}
            self.blocks = nn.scan(block, variable_axes=axes, split_rngs={"params": True}, length=self.n_layers,
                                  methods=["__call__", "weight_ops"])(cfg)
        elif self.n_layers:
            self.block_list = [block(cfg, name=f"block_{j}") for j in range(self.n_layers)]
        if self.last:
            self.ln_f = final_norm(cfg)
            if not cfg.tie_embeddings:
                self.lm_head = self.param("lm_head", init, (cfg.vocab_size, cfg.d_model))

    # The stage's own parametrised ops (embedding, final LayerNorm, LM head), as functions of their input.
    def _embed(self, tokens_BxL: jax.Array) -> jax.Array:
        x = jnp.take(self.wte, tokens_BxL, axis=0)
        if self.cfg.arch == "gpt3":
            x = x + self.wpe[: tokens_BxL.shape[1]]
        return x.astype(compute_dtype(self.cfg))

    def _head(self, h_BxLxD: jax.Array) -> jax.Array:
        w = self.wte if self.cfg.tie_embeddings else self.lm_head
        logits_BxLxV = jnp.einsum("bld,vd->blv", h_BxLxD, w.astype(compute_dtype(self.cfg)))
        return logits_BxLxV.astype(jnp.float32)

    def _op(self, name: str, fn: Any, x: jax.Array) -> jax.Array:
        self.sow(WEIGHT_INPUTS, name + "_in", x)
        return self.perturb(name + "_out", fn(x), collection=PERTURBATIONS)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.first:
            x = self._op("embed", self._embed, x)
        x_BxLxD = x.astype(compute_dtype(self.cfg))
        if self.n_layers and self.cfg.scan_blocks:
            x_BxLxD, _ = self.blocks(x_BxLxD, None)
        elif self.n_layers:
            for block in self.block_list:
                x_BxLxD, _ = block(x_BxLxD)
        if not self.last:
            return x_BxLxD
        return self._op("head", self._head, self._op("ln_f", self.ln_f, x_BxLxD))

    def weight_ops(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Every parametrised op of the stage applied to its recorded input: the outputs whose
        parameter gradient, against the output gradients, is the stage's weight gradient."""
        out: dict[str, Any] = {}
        if self.first:
            out["embed_out"] = self._embed(inputs["embed_in"][0])
        if self.n_layers and self.cfg.scan_blocks:
            out["blocks"] = self.blocks.weight_ops(None, inputs["blocks"])[1]
        elif self.n_layers:
            for j, block in enumerate(self.block_list):
                out[f"block_{j}"] = block.weight_ops(None, inputs[f"block_{j}"])[1]
        if self.last:
            out["ln_f_out"] = self.ln_f(inputs["ln_f_in"][0])
            out["head_out"] = self._head(inputs["head_in"][0])
        return out


def next_token_loss(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over all positions (targets are inputs shifted by one)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, targets_BxL).mean()


def layer_flops_per_token(cfg: ModelConfig) -> float:
    """Forward FLOPs of one block per token: 2 × its matmul weights + 4·s·d for attention's two
    products (gpt3: 24·d² + 4·s·d; llama: 2·(2·d² + 2·d·d_kv + 3·d·f) + 4·s·d)."""
    d, s = cfg.d_model, cfg.seq_len
    if cfg.arch == "llama":
        d_kv = cfg.kv_heads * (d // cfg.n_head)
        return 2.0 * (2 * d * d + 2 * d * d_kv + 3 * d * cfg.ffn_dim) + 4.0 * s * d
    return 2.0 * (4 * d * d + 2 * d * cfg.ffn_dim) + 4.0 * s * d


def model_flops_per_token(cfg: ModelConfig) -> float:
    """Model FLOPs (forward + backward, no recomputation) per trained token, LM head included:
    3 × (layers × layer_flops_per_token + 2·d·V). GPT-3 XL at seq 2048: 9.07 GFLOP per token."""
    return 3.0 * (cfg.n_layer * layer_flops_per_token(cfg) + 2 * cfg.d_model * cfg.vocab_size)
