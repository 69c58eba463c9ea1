"""How jaxpipe's per-layer parameters correspond to Hugging Face's tensors and config.json, for
GPT-2 (`model.arch: gpt3`) and LLaMA (`model.arch: llama`): one table serves import and export, so
import → export gives back the same tensors bit for bit (transposes and reshapes only; the import
widens to float32 exactly, and the export narrows back to the source's dtype exactly).

    jaxpipe (Flax, [in, out])                 GPT-2 (Conv1D, [in, out])          LLaMA (Linear, [out, in])
    embed/wte [V, d]                          wte.weight                         model.embed_tokens.weight
    embed/wpe [S, d]                          wpe.weight                         -
    layer_i/qkv/kernel [d, 3, n, h]           h.i.attn.c_attn.weight [d, 3d]     -
    layer_i/q/kernel [d, n, h]                -                                  ...q_proj.weight [n·h, d]
    layer_i/kv/kernel [d, 2, k, h]            -                                  ...k_proj, v_proj.weight [k·h, d]
    layer_i/proj/kernel [n, h, d]             h.i.attn.c_proj.weight [d, d]      ...o_proj.weight [d, n·h]
    layer_i/fc, out (kernel, bias)            h.i.mlp.c_fc, c_proj               -
    layer_i/gate_up/kernel [d, 2, f]          -                                  ...gate_proj, up_proj [f, d]
    layer_i/down/kernel [f, d]                -                                  ...down_proj [d, f]
    layer_i/ln_1, ln_2 (scale[, bias])        h.i.ln_1, ln_2                     input_/post_attention_layernorm
    head/ln_f                                 ln_f                               model.norm
    head/lm_head [V, d] (untied only)         -                                  lm_head.weight
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxpipe.config import ModelConfig
from jaxpipe.errors import ConfigError


@dataclass(frozen=True)
class Entry:
    """One jaxpipe parameter and the Hugging Face tensor(s) it is made of."""

    key: str  # per-layer key, e.g. layer_3/q/kernel
    hf: tuple[str, ...]  # Hugging Face tensor names
    hf_shapes: tuple[tuple[int, ...], ...]
    to_jax: Callable[..., np.ndarray]  # HF tensors -> jaxpipe array
    to_hf: Callable[[np.ndarray], list[np.ndarray]]  # jaxpipe array -> HF tensors


def _same(key: str, hf: str, shape: tuple[int, ...]) -> Entry:
    return Entry(key, (hf,), (shape,), lambda w: w, lambda x: [x])


def _reshaped(key: str, hf: str, shape: tuple[int, ...], jshape: tuple[int, ...]) -> Entry:
    return Entry(key, (hf,), (shape,), lambda w: w.reshape(jshape), lambda x: [x.reshape(shape)])


def _transposed(key: str, hf: str, shape: tuple[int, ...], jshape: tuple[int, ...]) -> Entry:
    """A Linear weight [out, in] as a kernel [in, ...] (`jshape`)."""
    return Entry(key, (hf,), (shape,), lambda w: np.ascontiguousarray(w.T).reshape(jshape),
                 lambda x: [x.reshape(shape[::-1]).T])


def _stacked(key: str, hfs: tuple[str, str], shape: tuple[int, int], jshape: tuple[int, ...]) -> Entry:
    """Two Linear weights [out, in] as one kernel [in, 2, ...] (one matmul for both)."""
    d_in, d_out = shape[1], shape[0]

    def to_hf(x: np.ndarray) -> list[np.ndarray]:
        both = x.reshape(d_in, 2, d_out)
        return [both[:, 0].T, both[:, 1].T]

    return Entry(key, hfs, (shape, shape), lambda a, b: np.stack([a.T, b.T], axis=1).reshape(jshape), to_hf)


def gpt2_prefix(names: set[str]) -> str:
    """GPT2LMHeadModel's files name tensors `transformer.h.0...`, GPT2Model's `h.0...`."""
    return "transformer." if any(n.startswith("transformer.") for n in names) else ""


def entries(model: ModelConfig, item: str, prefix: str = "") -> list[Entry]:
    """The table for one checkpoint item: `embed`, `layer_<i>` or `head`."""
    d, v, f, n = model.d_model, model.vocab_size, model.ffn_dim, model.n_head
    h = d // n
    if model.arch == "gpt3":
        p = prefix
        if item == "embed":
            return [_same("embed/wte", p + "wte.weight", (v, d)),
                    _same("embed/wpe", p + "wpe.weight", (model.seq_len, d))]
        if item == "head":
            return [_same("head/ln_f/scale", p + "ln_f.weight", (d,)), _same("head/ln_f/bias", p + "ln_f.bias", (d,))]
        i = int(item.removeprefix("layer_"))
        s, t = f"{item}/", f"{p}h.{i}."
        return [
            _same(s + "ln_1/scale", t + "ln_1.weight", (d,)), _same(s + "ln_1/bias", t + "ln_1.bias", (d,)),
            _reshaped(s + "qkv/kernel", t + "attn.c_attn.weight", (d, 3 * d), (d, 3, n, h)),
            _reshaped(s + "qkv/bias", t + "attn.c_attn.bias", (3 * d,), (3, n, h)),
            _reshaped(s + "proj/kernel", t + "attn.c_proj.weight", (d, d), (n, h, d)),
            _same(s + "proj/bias", t + "attn.c_proj.bias", (d,)),
            _same(s + "ln_2/scale", t + "ln_2.weight", (d,)), _same(s + "ln_2/bias", t + "ln_2.bias", (d,)),
            _same(s + "fc/kernel", t + "mlp.c_fc.weight", (d, f)),
            _same(s + "fc/bias", t + "mlp.c_fc.bias", (f,)),
            _same(s + "out/kernel", t + "mlp.c_proj.weight", (f, d)),
            _same(s + "out/bias", t + "mlp.c_proj.bias", (d,)),
        ]
    k = model.kv_heads
    if item == "embed":
        return [_same("embed/wte", "model.embed_tokens.weight", (v, d))]
    if item == "head":
        head = [_same("head/ln_f/scale", "model.norm.weight", (d,))]
        return head + ([] if model.tie_embeddings else [_same("head/lm_head", "lm_head.weight", (v, d))])
    i = int(item.removeprefix("layer_"))
    s, t = f"{item}/", f"model.layers.{i}."
    return [
        _same(s + "ln_1/scale", t + "input_layernorm.weight", (d,)),
        _transposed(s + "q/kernel", t + "self_attn.q_proj.weight", (n * h, d), (d, n, h)),
        _stacked(s + "kv/kernel", (t + "self_attn.k_proj.weight", t + "self_attn.v_proj.weight"), (k * h, d),
                 (d, 2, k, h)),
        _transposed(s + "proj/kernel", t + "self_attn.o_proj.weight", (d, n * h), (n, h, d)),
        _same(s + "ln_2/scale", t + "post_attention_layernorm.weight", (d,)),
        _stacked(s + "gate_up/kernel", (t + "mlp.gate_proj.weight", t + "mlp.up_proj.weight"), (f, d), (d, 2, f)),
        _transposed(s + "down/kernel", t + "mlp.down_proj.weight", (d, f), (f, d)),
    ]


def item_order(model: ModelConfig) -> list[str]:
    return ["embed", *(f"layer_{i}" for i in range(model.n_layer)), "head"]


# Tensors the files may hold that are not parameters (buffers older transformers saved), and the
# tied head's copy of the embedding.
def ignorable(model: ModelConfig, name: str) -> bool:
    if model.arch == "gpt3":
        return name.endswith((".attn.bias", ".attn.masked_bias")) or name == "lm_head.weight"
    return name.endswith(".rotary_emb.inv_freq") or (model.tie_embeddings and name == "lm_head.weight")


# ---- config.json ---------------------------------------------------------------------------------


def _get(cfg: dict[str, Any], key: str, default: Any = None, required: bool = False) -> Any:
    if key not in cfg or cfg[key] is None:
        if required:
            raise ConfigError(f"config.json: field '{key}' is missing")
        return default
    return cfg[key]


def _refuse(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"config.json: {field}={value!r} is not supported: {why}")


def model_from_hf(cfg: dict[str, Any]) -> ModelConfig:
    """The jaxpipe model section of a GPT-2 or LLaMA config.json; anything the model would compute
    differently is refused with the field named."""
    kind = cfg.get("model_type")
    if kind == "gpt2":
        d = _get(cfg, "n_embd", required=True)
        act = _get(cfg, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise _refuse("activation_function", act, "jaxpipe's GPT uses the tanh-approximated GELU (gelu_new)")
        for key, want in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                          ("reorder_and_upcast_attn", False), ("tie_word_embeddings", True)):
            if _get(cfg, key, want) != want:
                raise _refuse(key, cfg[key], f"jaxpipe's GPT-2 needs {want}")
        n_inner = _get(cfg, "n_inner")
        return ModelConfig(preset="hf", arch="gpt3", n_layer=_get(cfg, "n_layer", required=True), d_model=d,
                           n_head=_get(cfg, "n_head", required=True), seq_len=_get(cfg, "n_positions", required=True),
                           vocab_size=_get(cfg, "vocab_size", required=True),
                           d_ff=0 if n_inner in (None, 4 * d) else n_inner,
                           ln_eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)),
                           init_std=float(_get(cfg, "initializer_range", 0.02)), tie_embeddings=True)
    if kind != "llama":
        raise _refuse("model_type", kind, "jaxpipe imports gpt2 and llama")
    for key in ("attention_bias", "mlp_bias"):
        if _get(cfg, key, False):
            raise _refuse(key, cfg[key], "a bias where LLaMA has none")
    act = _get(cfg, "hidden_act", "silu")
    if act != "silu":
        raise _refuse("hidden_act", act, "LLaMA's MLP is SwiGLU (silu)")
    d, n = _get(cfg, "hidden_size", required=True), _get(cfg, "num_attention_heads", required=True)
    head_dim = _get(cfg, "head_dim", d // n)
    if head_dim * n != d:
        raise _refuse("head_dim", head_dim, f"jaxpipe needs head_dim = hidden_size / num_attention_heads ({d // n})")
    if _get(cfg, "pretraining_tp", 1) != 1:
        raise _refuse("pretraining_tp", cfg["pretraining_tp"], "only 1 (the exact matmuls) is supported")
    # transformers 5 writes `rope_parameters` (with rope_theta inside); 4.x `rope_theta` and `rope_scaling`.
    rope = dict(_get(cfg, "rope_parameters") or _get(cfg, "rope_scaling") or {})
    field = "rope_parameters" if cfg.get("rope_parameters") else "rope_scaling"
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(rope.get("rope_theta", _get(cfg, "rope_theta", 10000.0)))
    scaling: dict[str, Any] = {}
    if rope_type == "llama3":
        try:
            scaling = dict(rope_scaling="llama3", rope_factor=float(rope["factor"]),
                           rope_low_freq_factor=float(rope["low_freq_factor"]),
                           rope_high_freq_factor=float(rope["high_freq_factor"]),
                           rope_original_max_len=int(rope["original_max_position_embeddings"]))
        except KeyError as e:
            raise ConfigError(f"config.json: {field} of type llama3 lacks {e.args[0]!r}") from None
    elif rope_type != "default":
        raise _refuse(f"{field}.rope_type", rope_type, "jaxpipe's RoPE knows 'default' and 'llama3'")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise _refuse(f"{field}.partial_rotary_factor", rope["partial_rotary_factor"], "RoPE rotates whole heads")
    return ModelConfig(
        preset="hf", arch="llama", n_layer=_get(cfg, "num_hidden_layers", required=True), d_model=d, n_head=n,
        n_kv_head=_get(cfg, "num_key_value_heads", n), d_ff=_get(cfg, "intermediate_size", required=True),
        seq_len=_get(cfg, "max_position_embeddings", required=True), vocab_size=_get(cfg, "vocab_size", required=True),
        ln_eps=float(_get(cfg, "rms_norm_eps", 1e-6)), init_std=float(_get(cfg, "initializer_range", 0.02)),
        tie_embeddings=bool(_get(cfg, "tie_word_embeddings", False)), rope_theta=theta, **scaling)


def llama_config(model: ModelConfig, dtype: str, bos_id: int | None, eos_id: int | None) -> dict[str, Any]:
    """A transformers LlamaConfig's config.json for `model` (transformers 5's `rope_parameters`)."""
    rope: dict[str, Any] = {"rope_theta": model.rope_theta, "rope_type": "default"}
    if model.rope_scaling == "llama3":
        rope.update(rope_type="llama3", factor=model.rope_factor, low_freq_factor=model.rope_low_freq_factor,
                    high_freq_factor=model.rope_high_freq_factor,
                    original_max_position_embeddings=model.rope_original_max_len)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model.vocab_size,
        "hidden_size": model.d_model, "intermediate_size": model.ffn_dim, "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head, "num_key_value_heads": model.kv_heads,
        "head_dim": model.d_model // model.n_head, "hidden_act": "silu", "max_position_embeddings": model.seq_len,
        "initializer_range": model.init_std, "rms_norm_eps": model.ln_eps, "use_cache": True,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": None, "pretraining_tp": 1,
        "tie_word_embeddings": model.tie_embeddings, "rope_parameters": rope, "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "dtype": dtype,
    }
