"""A Hugging Face GPT-2 or LLaMA model directory as a jaxpipe checkpoint (`jaxpipe import-hf HF_DIR OUT`).

Reads config.json (refusing what jaxpipe would compute differently, with the field named: see
`jaxpipe.export.hf_map.model_from_hf`), the weights from model.safetensors or a sharded checkpoint's
model.safetensors.index.json, and the tokenizer.json if there is one. Writes a parameters-only
per-layer checkpoint (`jaxpipe.train.checkpoint.write_params`) that any PP/DP layout loads and that
`train.init_from` fine-tunes, with the tokenizer and the original config.json beside it.

Streaming: the safetensors files are memory-mapped (safetensors' NumPy API) and read one item
(the embedding, one layer, the head) at a time; each item is converted to float32, written by orbax
and dropped before the next is read. So host memory holds at most the largest item in float32 plus
its tensors as read, never the model: for Llama-3.2-1B that is the 128256 × 2048 embedding, 1.05 GB
in float32 + 0.53 GB as read from bfloat16 (BENCHMARKS.md has the measured peak).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from jaxpipe.config import ModelConfig
from jaxpipe.errors import ConfigError
from jaxpipe.export import hf_map

HF_CONFIG_FILE = "hf_config.json"  # the imported config.json, kept in the checkpoint for export
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors' names


def read_hf_config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise ConfigError(f"'{hf_dir}' has no config.json (expected a Hugging Face model directory)")
    try:
        cfg = json.loads(path.read_text())
    except ValueError as e:
        raise ConfigError(f"'{path}' is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"'{path}' is not a JSON object")
    return cfg


def weight_files(hf_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (a sharded checkpoint's index, or the one file)."""
    from safetensors import safe_open

    index = hf_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"'{index}' is not a safetensors index (no weight_map): {e}") from None
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise ConfigError(f"'{index}' names shard '{path.name}', which is not in '{hf_dir}'")
        return files
    single = hf_dir / SINGLE_FILE
    if not single.is_file():
        raise ConfigError(f"'{hf_dir}' has neither {SINGLE_FILE} nor {INDEX_FILE} (only safetensors weights are "
                          f"read: convert a pytorch_model.bin with transformers' save_pretrained first)")
    with safe_open(str(single), framework="numpy") as f:
        return {name: single for name in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)


class _Tensors:
    """Tensors by name, each read from its file on demand: a file is mapped only while one of its
    tensors is read (a handle kept open would leave every page read so far mapped, and counted in the
    process's resident memory, until the end)."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self.files = files
        self.meta: dict[str, tuple[tuple[int, ...], str]] = {}
        for path in sorted(set(files.values())):
            with safe_open(str(path), framework="numpy") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    sl = f.get_slice(name)
                    self.meta[name] = (tuple(sl.get_shape()), str(sl.get_dtype()))

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self.meta:
            raise ConfigError(f"tensor '{name}': the index places it in '{self.files[name]}', which does not hold it")
        return self.meta[name][0]

    def dtype(self, name: str) -> str:
        return self.meta[name][1]

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), framework="numpy") as f:
            return f.get_tensor(name)


def check_tensors(model: ModelConfig, tensors: _Tensors, prefix: str) -> str:
    """Every tensor the model needs is there with its shape and a float dtype, and nothing else is (a
    bias LLaMA has no place for, a tensor of another architecture), before anything is written.
    Returns their dtype (float32 when they differ), for export to write them back as they came."""
    wanted: dict[str, tuple[int, ...]] = {}
    for item in hf_map.item_order(model):
        for e in hf_map.entries(model, item, prefix):
            wanted.update(zip(e.hf, e.hf_shapes, strict=True))
    for name, shape in wanted.items():
        if name not in tensors.files:
            raise ConfigError(f"tensor '{name}' is missing from the checkpoint (config.json describes a "
                              f"{model.n_layer}-layer {model.arch} model)")
        if (got := tensors.shape(name)) != shape:
            raise ConfigError(f"tensor '{name}' has shape {list(got)}, config.json implies {list(shape)}")
        if (dtype := tensors.dtype(name)) not in _DTYPES:
            raise ConfigError(f"tensor '{name}' is of dtype {dtype}: jaxpipe reads F32, BF16 and F16 weights")
    for name in sorted(set(tensors.files) - set(wanted)):
        if hf_map.ignorable(model, name):
            continue
        if model.arch == "llama" and name.endswith(".bias"):
            raise ConfigError(f"tensor '{name}' is a bias, and LLaMA has none (attention_bias and mlp_bias are "
                              f"unsupported)")
        raise ConfigError(f"tensor '{name}' has no place in a {model.arch} model (jaxpipe imports GPT2LMHeadModel "
                          f"and LlamaForCausalLM checkpoints)")
    dtypes = {_DTYPES[tensors.dtype(name)] for name in wanted}
    return dtypes.pop() if len(dtypes) == 1 else "float32"


def _nest(flat: dict[str, np.ndarray], item: str) -> dict[str, Any]:
    from jaxpipe.train.checkpoint import unflatten

    return unflatten({key.removeprefix(item + "/"): value for key, value in flat.items()})


def _items(model: ModelConfig, tensors: _Tensors, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """One item at a time, in float32 (exact from float16 and bfloat16)."""
    for item in hf_map.item_order(model):
        flat = {}
        for e in hf_map.entries(model, item, prefix):
            flat[e.key] = np.asarray(e.to_jax(*(tensors.get(n) for n in e.hf)), np.float32)
        yield item, _nest(flat, item)


def import_hf(hf_dir: str | Path, out: str | Path, log: Callable[[str], None] = print) -> Path:
    """Converts the Hugging Face directory `hf_dir` into the jaxpipe checkpoint directory `out`."""
    from jaxpipe.train import checkpoint

    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise ConfigError(f"no such directory '{hf_dir}'")
    hf_cfg = read_hf_config(hf_dir)
    model = hf_map.model_from_hf(hf_cfg)
    files: dict[str, Path] = {HF_CONFIG_FILE: hf_dir / "config.json"}
    tok_path = hf_dir / TOKENIZER_FILE
    if tok_path.is_file():
        from jaxpipe.data.prepare import load_tokenizer

        n_tok = load_tokenizer(tok_path).get_vocab_size()
        if n_tok > model.vocab_size:
            raise ConfigError(f"'{tok_path}' has {n_tok} tokens but config.json's vocab_size is {model.vocab_size}: "
                              f"the tokenizer does not belong to this model")
        files[TOKENIZER_FILE] = tok_path
    for extra in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (hf_dir / extra).is_file():
            files[extra] = hf_dir / extra
    tensors = _Tensors(weight_files(hf_dir))
    prefix = hf_map.gpt2_prefix(set(tensors.files)) if model.arch == "gpt3" else ""
    dtype = check_tensors(model, tensors, prefix)
    source = {"hf_dir": str(hf_dir.absolute()), "model_type": hf_cfg["model_type"], "prefix": prefix, "dtype": dtype}
    out = checkpoint.write_params(out, model, _items(model, tensors, prefix), {"source": source}, files)
    log(f"{out}: {model.arch} ({model.n_layer} layers, d {model.d_model}, heads {model.n_head}"
        f"{f'/{model.kv_heads} kv' if model.arch == 'llama' else ''}, vocab {model.vocab_size}, "
        f"{'tied' if model.tie_embeddings else 'untied'} head, {source['dtype']}) from {hf_dir}"
        + ("" if TOKENIZER_FILE in files else " (no tokenizer.json there: prepare data with your own)"))
    return out


def copy_tokenizer_files(ckpt: Path, out: Path) -> None:
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
