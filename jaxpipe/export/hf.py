"""A checkpoint as a Hugging Face GPT-2 model directory (`jaxpipe export-hf`).

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


def gpt2_state_dict(model: ModelConfig, flat: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """GPT2LMHeadModel's tensors (the tied `lm_head.weight` is left to `tie_word_embeddings`)."""
    d = model.d_model
    out = {"transformer.wte.weight": flat["embed/wte"], "transformer.wpe.weight": flat["embed/wpe"],
           "transformer.ln_f.weight": flat["head/ln_f/scale"], "transformer.ln_f.bias": flat["head/ln_f/bias"]}
    for i in range(model.n_layer):
        src, dst = f"layer_{i}/", f"transformer.h.{i}."
        out |= {
            dst + "ln_1.weight": flat[src + "ln_1/scale"], dst + "ln_1.bias": flat[src + "ln_1/bias"],
            dst + "attn.c_attn.weight": flat[src + "qkv/kernel"].reshape(d, 3 * d),
            dst + "attn.c_attn.bias": flat[src + "qkv/bias"].reshape(3 * d),
            dst + "attn.c_proj.weight": flat[src + "proj/kernel"].reshape(d, d),
            dst + "attn.c_proj.bias": flat[src + "proj/bias"],
            dst + "ln_2.weight": flat[src + "ln_2/scale"], dst + "ln_2.bias": flat[src + "ln_2/bias"],
            dst + "mlp.c_fc.weight": flat[src + "fc/kernel"], dst + "mlp.c_fc.bias": flat[src + "fc/bias"],
            dst + "mlp.c_proj.weight": flat[src + "out/kernel"], dst + "mlp.c_proj.bias": flat[src + "out/bias"],
        }
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}


def export_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None,
              log: Callable[[str], None] = print) -> Path:
    """Writes config.json, model.safetensors and (if the checkpoint or `tokenizer` has one) the tokenizer."""
    from safetensors.numpy import save_file

    ckpt = checkpoint.resolve(ckpt)
    model, flat = checkpoint.load_flat(ckpt)
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
    (out / "config.json").write_text(json.dumps(gpt2_config(model, eos_id), indent=2) + "\n")
    save_file(gpt2_state_dict(model, flat), str(out / "model.safetensors"), metadata={"format": "pt"})
    if tok_path.is_file():
        shutil.copyfile(tok_path, out / "tokenizer.json")
        special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT} if eos_id is not None else {}
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model.seq_len,
            "add_prefix_space": False, "clean_up_tokenization_spaces": False, **special,
        }, indent=2) + "\n")
        (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    log(f"{out}: GPT-2 ({model.n_layer} layers, d {model.d_model}, vocab {model.vocab_size}) from {ckpt}"
        + ("" if tok_path.is_file() else " (no tokenizer in the checkpoint: pass --tokenizer)"))
    return out
