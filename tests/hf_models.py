"""Tiny Hugging Face models with random weights, created locally by transformers (nothing is
downloaded), for the import/export and fine-tuning tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def tiny_llama(path: Path, tied: bool, n_kv: int = 2, dtype: str = "float32", *, vocab: int = 96, seq: int = 16,
               hidden: int = 32, ff: int = 48, layers: int = 3, heads: int = 4, **extra: Any) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ff,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=n_kv,
                                   max_position_embeddings=seq, rope_theta=50000.0, rms_norm_eps=1e-5,
                                   tie_word_embeddings=tied, **extra)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # RMSNorm scales start at 1: make them matter
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(path)
    return path


def imported_llama(root: Path, tied: bool, **kwargs: Any) -> Path:
    """A tiny LLaMA imported by `jaxpipe import-hf` into root/ckpt (its HF directory in root/hf)."""
    from jaxpipe.export.hf_import import import_hf

    return import_hf(tiny_llama(root / "hf", tied, **kwargs), root / "ckpt", log=lambda s: None)
