"""`jaxpipe import-hf` and `export-hf` against transformers' own models (tiny, random, created here:
nothing is downloaded): imported GPT-2 and LLaMA (grouped-query, tied and untied heads) give
transformers' logits, import → export gives back the files' tensors bit for bit, the imported
checkpoint loads into any pipeline partition, and every refusal names its field or tensor."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hf_models import tiny_llama

from jaxpipe.config import ModelConfig
from jaxpipe.errors import ConfigError
from jaxpipe.export.hf import export_hf
from jaxpipe.export.hf_import import import_hf
from jaxpipe.model.gpt import StageModel
from jaxpipe.pipeline.partition import StageSpec
from jaxpipe.train import checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SEQ = 16
VOCAB = 96


def _llama(path: Path, tied: bool, n_kv: int = 2, dtype: str = "float32", **extra) -> Path:
    return tiny_llama(path, tied, n_kv, dtype, vocab=VOCAB, seq=SEQ, **extra)


def _gpt2(path: Path) -> Path:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


def _hf_logits(hf_dir: Path, tokens: np.ndarray) -> np.ndarray:
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _our_logits(ckpt: Path, tokens: np.ndarray, scan_blocks: bool = True) -> np.ndarray:
    model, params = checkpoint.load_model(ckpt, dtype="float32", scan_blocks=scan_blocks)
    module = StageModel(model, n_layers=model.n_layer, first=True, last=True)
    return np.asarray(module.apply({"params": params}, jnp.asarray(tokens, jnp.int32)))


def _tokens() -> np.ndarray:
    return np.random.default_rng(0).integers(0, VOCAB, (2, SEQ))


def _rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.mark.parametrize("tied,n_kv", [(False, 2), (True, 2), (False, 4)], ids=["gqa-untied", "gqa-tied", "mha"])
def test_llama_logits_equal_transformers(tmp_path: Path, tied: bool, n_kv: int) -> None:
    hf_dir = _llama(tmp_path / "hf", tied, n_kv)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    tokens = _tokens()
    assert _rel_err(_our_logits(ckpt, tokens), _hf_logits(hf_dir, tokens)) <= 1e-5


def test_llama3_rope_scaling_logits_equal_transformers(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 50000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8}
    hf_dir = _llama(tmp_path / "hf", True, rope_parameters=rope)
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    assert checkpoint.model_config(checkpoint.read_state(ckpt)).rope_scaling == "llama3"
    tokens = _tokens()
    assert _rel_err(_our_logits(ckpt, tokens), _hf_logits(hf_dir, tokens)) <= 1e-5


def test_gpt2_logits_equal_transformers(tmp_path: Path) -> None:
    hf_dir = _gpt2(tmp_path / "hf")
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    tokens = _tokens()
    assert _rel_err(_our_logits(ckpt, tokens), _hf_logits(hf_dir, tokens)) <= 1e-5


def _tensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path))


@pytest.mark.parametrize("kind", ["llama-untied", "llama-tied-bf16", "gpt2"])
def test_import_export_round_trip_is_exact(tmp_path: Path, kind: str) -> None:
    if kind == "gpt2":
        hf_dir = _gpt2(tmp_path / "hf")
    else:
        hf_dir = _llama(tmp_path / "hf", tied=kind != "llama-untied",
                        dtype="bfloat16" if kind.endswith("bf16") else "float32")
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    out = export_hf(ckpt, tmp_path / "out", log=lambda s: None)
    src, back = _tensors(hf_dir / "model.safetensors"), _tensors(out / "model.safetensors")
    src = {k: v for k, v in src.items() if not (k == "lm_head.weight" and "lm_head.weight" not in back)}
    assert sorted(src) == sorted(back)
    for name, tensor in src.items():
        assert back[name].dtype == tensor.dtype and back[name].shape == tensor.shape, name
        assert back[name].tobytes() == tensor.tobytes(), name
    # and transformers loads the export (its config.json too)
    tokens = _tokens()
    if kind != "llama-tied-bf16":
        assert _rel_err(_hf_logits(out, tokens), _hf_logits(hf_dir, tokens)) == 0.0


def test_sharded_checkpoint_with_index(tmp_path: Path) -> None:
    """A sharded checkpoint (model.safetensors.index.json) reads like the single file."""
    hf_dir = _llama(tmp_path / "hf", tied=False)
    model = transformers.LlamaForCausalLM.from_pretrained(hf_dir)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    a = checkpoint.load_flat(import_hf(hf_dir, tmp_path / "a", log=lambda s: None))[1]
    b = checkpoint.load_flat(import_hf(tmp_path / "sharded", tmp_path / "b", log=lambda s: None))[1]
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("tied", [False, True])
def test_imported_checkpoint_loads_into_any_partition(tmp_path: Path, tied: bool) -> None:
    """Stages [0,1) [1,3) of the imported model, chained, give the whole model's logits; the last
    stage has the head's own matrix (untied) or the embedding's copy (tied), and no `wte` when untied."""
    ckpt = import_hf(_llama(tmp_path / "hf", tied), tmp_path / "ckpt", log=lambda s: None)
    model = checkpoint.model_config(checkpoint.read_state(ckpt), dtype="float32", scan_blocks=False)
    tokens = jnp.asarray(_tokens(), jnp.int32)
    x = tokens
    for spec in (StageSpec(index=0, n_stages=2, start=0, stop=1), StageSpec(index=1, n_stages=2, start=1, stop=3)):
        module = StageModel(model, n_layers=spec.stop - spec.start, first=spec.first, last=spec.last)
        template = jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]
        params = checkpoint.load_stage(ckpt, model, spec, template)
        if spec.last:
            assert ("wte" in params) == tied and ("lm_head" in params) != tied
        x = module.apply({"params": params}, x)
    np.testing.assert_array_equal(np.asarray(x), _our_logits(ckpt, np.asarray(tokens), scan_blocks=False))


# ---- refusals ----------------------------------------------------------------------------------------


def _edit_config(hf_dir: Path, **changes) -> None:
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))


def _refused(hf_dir: Path, out: Path, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        import_hf(hf_dir, out, log=lambda s: None)
    assert not out.exists()  # nothing half-written


def test_refusals(tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    base = _llama(tmp_path / "base", tied=False)

    def fresh(name: str) -> Path:
        return Path(shutil.copytree(base, tmp_path / name))

    out = tmp_path / "out"
    d = fresh("yarn")
    _edit_config(d, rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0})
    _refused(d, out, "config.json: rope_parameters.rope_type='yarn' is not supported: jaxpipe's RoPE knows "
                     "'default' and 'llama3'")
    d = fresh("bias")
    _edit_config(d, attention_bias=True)
    _refused(d, out, "config.json: attention_bias=True is not supported: a bias where LLaMA has none")
    d = fresh("bias_tensor")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.bias"] = np.zeros(32, np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _refused(d, out, "tensor 'model.layers.1.mlp.down_proj.bias' is a bias, and LLaMA has none")
    d = fresh("missing")
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["model.layers.2.self_attn.k_proj.weight"]
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _refused(d, out, "tensor 'model.layers.2.self_attn.k_proj.weight' is missing from the checkpoint "
                     "(config.json describes a 3-layer llama model)")
    d = fresh("misshaped")
    tensors = load_file(str(d / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = np.zeros((40, 32), np.float32)
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    _refused(d, out, "tensor 'model.layers.0.mlp.up_proj.weight' has shape [40, 32], config.json implies [48, 32]")
    d = fresh("vocab")
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB + 4)}, unk_token="w0")).save(str(d / "tokenizer.json"))
    _refused(d, out, f"tokenizer.json' has {VOCAB + 4} tokens but config.json's vocab_size is {VOCAB}: the "
                     f"tokenizer does not belong to this model")
    d = fresh("arch")
    _edit_config(d, model_type="mistral")
    _refused(d, out, "config.json: model_type='mistral' is not supported: jaxpipe imports gpt2 and llama")
    d = fresh("field")
    _edit_config(d, hidden_size=None)
    _refused(d, out, "config.json: field 'hidden_size' is missing")


def test_weight_memory_is_one_item_at_a_time(tmp_path: Path) -> None:
    """The writer receives items one by one from a generator: the converter never materialises the
    model (what BENCHMARKS.md's peak-memory measurement relies on)."""
    hf_dir = _llama(tmp_path / "hf", tied=False)
    seen: list[str] = []
    real = checkpoint.write_params

    def spy(out, model, items, state, files=None):  # type: ignore[no-untyped-def]
        assert not isinstance(items, list | tuple | dict)

        def watched():  # type: ignore[no-untyped-def]
            for name, tree in items:
                seen.append(name)
                yield name, tree
        return real(out, model, watched(), state, files)

    import jaxpipe.train.checkpoint as ck

    ck.write_params = spy  # type: ignore[assignment]
    try:
        import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    finally:
        ck.write_params = real  # type: ignore[assignment]
    assert seen == ["embed", "layer_0", "layer_1", "layer_2", "head"]


def test_model_config_of_import(tmp_path: Path) -> None:
    ckpt = import_hf(_llama(tmp_path / "hf", tied=False), tmp_path / "ckpt", log=lambda s: None)
    model = checkpoint.model_config(checkpoint.read_state(ckpt))
    assert (model.arch, model.n_kv_head, model.d_ff, model.tie_embeddings, model.rope_theta, model.seq_len) == (
        "llama", 2, 48, False, 50000.0, SEQ)
    assert isinstance(model, ModelConfig)


# ---- train.init_from: the run adopts the checkpoint's model section ---------------------------------


def test_init_from_adopts_the_model_and_refuses_disagreeing_keys(tmp_path: Path) -> None:
    from jaxpipe.train.finetune import load_config

    ckpt = import_hf(_llama(tmp_path / "hf", tied=False), tmp_path / "ckpt", log=lambda s: None)
    saved = checkpoint.model_config(checkpoint.read_state(ckpt))
    cfg = load_config(None, [f"train.init_from={ckpt}", "parallel.pp=1", "model.dtype=bfloat16",
                             "model.seq_len=8", "model.scan_blocks=false"])
    # adopted, with the keys that fix no parameter kept (and a shorter RoPE length)
    assert cfg.model == dataclasses.replace(saved, dtype="bfloat16", seq_len=8, scan_blocks=False)
    with pytest.raises(ConfigError, match=re.escape(
            f"train.init_from={ckpt}: the run adopts the checkpoint's model section, and model.n_layer=4 (the "
            f"checkpoint's is 3); model.tie_embeddings=True (the checkpoint's is False) disagree with it: drop "
            f"them (only model.dtype, attention, scan_blocks, remat and a shorter seq_len may differ)")):
        load_config(None, [f"train.init_from={ckpt}", "model.n_layer=4", "model.tie_embeddings=true"])
    with pytest.raises(ConfigError, match=re.escape("model.seq_len=32 (the checkpoint's is 16)")):
        load_config(None, [f"train.init_from={ckpt}", "model.seq_len=32", "parallel.pp=1"])
    with pytest.raises(ConfigError, match=re.escape("model.d_model=2048 (the checkpoint's is 32)")):  # via a preset
        load_config(None, [f"train.init_from={ckpt}", "model.preset=llama-3.2-1b", "parallel.pp=1"])
    with pytest.raises(ConfigError, match=re.escape("no checkpoint at")):
        load_config(None, [f"train.init_from={tmp_path / 'nothing'}"])


def test_init_from_refuses_data_of_another_tokenizer(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from jaxpipe.data.prepare import prepare_data
    from jaxpipe.train.finetune import load_config

    hf_dir = _llama(tmp_path / "hf", tied=False)
    for name, words in (("hf", 90), ("other", 80)):
        tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(words)}, unk_token="w0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        (tmp_path / name).mkdir(exist_ok=True)
        tok.save(str(tmp_path / name / "tokenizer.json"))
    ckpt = import_hf(hf_dir, tmp_path / "ckpt", log=lambda s: None)
    assert (ckpt / "tokenizer.json").read_bytes() == (hf_dir / "tokenizer.json").read_bytes()
    (tmp_path / "text.txt").write_text("w1 w2 w3 " * 200)
    ok = prepare_data([tmp_path / "text.txt"], tmp_path / "data", tokenizer_path=ckpt / "tokenizer.json",
                      log=lambda s: None)
    assert ok["vocab_size"] == 90
    load_config(None, [f"train.init_from={ckpt}", "data.source=tokens", f"data.path={tmp_path / 'data'}",
                       "parallel.pp=1"])
    prepare_data([tmp_path / "text.txt"], tmp_path / "data2", tokenizer_path=tmp_path / "other" / "tokenizer.json",
                 log=lambda s: None)
    with pytest.raises(ConfigError, match=re.escape(
            f"data.path '{tmp_path / 'data2'}' was tokenised with another tokenizer than train.init_from's")):
        load_config(None, [f"train.init_from={ckpt}", "data.source=tokens", f"data.path={tmp_path / 'data2'}",
                           "parallel.pp=1"])
