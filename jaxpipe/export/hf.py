"""A checkpoint as a Hugging Face GPT-2 or LLaMA model directory (`jaxpipe export-hf`).

The tensor correspondence for both is `jaxpipe.export.hf_map` (shared with `jaxpipe import-hf`, so
import → export is exact); below, GPT-2's in detail.

jaxpipe's GPT is GPT-2's architecture: pre-LN blocks, tanh-approximated GELU (`gelu_new`),
learned positions, the LM head tied to the token embedding, attention scaled by 1/sqrt(d_head).
Only the weight layout differs:

    jaxpipe (Flax)                         GPT-2 (Conv1D weights are [in, out])
    qkv/kernel [d, 3, n_head, d_head]  ->  attn.c_attn.weight [d, 3d]   (q | k | v, each heads-major)
    qkv/bias   [3, n_head, d_head]     ->  attn.c_attn.bias   [3d]
    proj/kernel [n_head, d_head, d]    ->  attn.c_proj.weight [d, d]
    fc/kernel [d, 4d], out/kernel [4d, d] -> mlp.c_fc.weight, mlp.c_proj.weight (same layout)
    ln_*/scale, ln_*/bias              ->  ln_*.weight, ln_*.bias

The weights are written with safetensors' NumPy API, so exporting needs neither torch nor transformers.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from jaxpipe.config import ModelConfig
from jaxpipe.errors import ConfigError
from jaxpipe.export import hf_map
from jaxpipe.train import checkpoint


def gpt2_config(model: ModelConfig, eos_id: int | None) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": model.vocab_size,
        "n_positions": model.seq_len,
        "n_ctx": model.seq_len,
        "n_embd": model.d_model,
        "n_layer": model.n_layer,
        "n_head": model.n_head,
        "n_inner": 4 * model.d_model,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": model.ln_eps,
        "initializer_range": model.init_std,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "torch_dtype": "float32",
    }


def hf_state_dict(model: ModelConfig, flat: dict[str, np.ndarray], dtype: str = "float32",
                  prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's or LlamaForCausalLM's tensors (jaxpipe.export.hf_map; a tied head is left to
    `tie_word_embeddings`), in `dtype`."""
    import ml_dtypes

    np_dtype = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]
    out = {}
    for item in hf_map.item_order(model):
        for e in hf_map.entries(model, item, prefix):
            for name, tensor in zip(e.hf, e.to_hf(flat[e.key]), strict=True):
                out[name] = np.ascontiguousarray(tensor.astype(np_dtype))
    return out


def export_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None,
              log: Callable[[str], None] = print, dtype: str | None = None) -> Path:
    """Writes config.json, model.safetensors and (if the checkpoint or `tokenizer` has one) the tokenizer.
    `dtype` of the tensors: by default the imported model's (`jaxpipe import-hf` records it), else float32."""
    from safetensors.numpy import save_file

    ckpt = checkpoint.resolve(ckpt)
    source = checkpoint.read_state(ckpt).get("source", {})
    dtype = dtype or source.get("dtype", "float32")
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype}: choose float32, bfloat16 or float16")
    model, flat = checkpoint.load_flat(ckpt)
    if model.arch == "gpt3" and (not model.tie_embeddings or model.d_ff not in (0, 4 * model.d_model)):
        raise ConfigError("export-hf writes GPT-2 for model.arch=gpt3, whose head is tied and whose MLP is "
                          "4 × d_model wide: this checkpoint's model is not (model.tie_embeddings, model.d_ff)")
    tok_path = Path(tokenizer) if tokenizer else ckpt / checkpoint.TOKENIZER_FILE
    eos_id = None
    if tok_path.is_file():
        from jaxpipe.data.prepare import EOT, load_tokenizer

        tok = load_tokenizer(tok_path)
        eos_id = tok.token_to_id(EOT)
        if tok.get_vocab_size() > model.vocab_size:
            raise ConfigError(f"tokenizer '{tok_path}' has {tok.get_vocab_size()} tokens, more than the "
                              f"model's vocabulary ({model.vocab_size})")
    elif tokenizer:
        raise ConfigError(f"--tokenizer: no such file '{tokenizer}'")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if model.arch == "llama":
        from jaxpipe.export.hf_import import HF_CONFIG_FILE

        imported = json.loads((ckpt / HF_CONFIG_FILE).read_text()) if (ckpt / HF_CONFIG_FILE).is_file() else {}
        config = hf_map.llama_config(model, dtype, imported.get("bos_token_id", eos_id),
                                     imported.get("eos_token_id", eos_id))
        prefix = ""
    else:
        config = {**gpt2_config(model, eos_id), "torch_dtype": dtype}
        prefix = source.get("prefix", "transformer.")
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(hf_state_dict(model, flat, dtype, prefix), str(out / "model.safetensors"), metadata={"format": "pt"})
    from jaxpipe.export.hf_import import copy_tokenizer_files

    copy_tokenizer_files(ckpt, out)
    if tok_path.is_file() and (ckpt / "tokenizer_config.json").is_file():
        shutil.copyfile(tok_path, out / "tokenizer.json")  # the imported tokenizer with its own settings
    elif tok_path.is_file():
        shutil.copyfile(tok_path, out / "tokenizer.json")
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eos_id is not None else {}
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.seq_len,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special,
        }, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    kind = "LLaMA" if model.arch == "llama" else "GPT-2"
    log(f"{out}: {kind} ({model.n_layer} layers, d {model.d_model}, vocab {model.vocab_size}) from {ckpt}"
        + ("" if tok_path.is_file() else " (no tokenizer in the checkpoint: pass --tokenizer)"))
    return out
