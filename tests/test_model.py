import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxpipe.config import load_config
from jaxpipe.model import gpt
from jaxpipe.model.gpt import StageModel, next_token_loss
from jaxpipe.model.layout import (
    assemble_stage_params,
    flatten_per_layer,
    init_embedding,
    init_final_ln,
    init_layer,
    init_stage_params,
    param_count,
    stage_param_counts,
)

SMALL = ["model.n_layer=4", "model.d_model=32", "model.n_head=4", "model.seq_len=16", "model.vocab_size=64"]


LLAMA = ["model.arch=llama", "model.n_kv_head=2", "model.d_ff=48", "model.rope_theta=500000"]
# Each test below runs on GPT-3 blocks and on LLaMA blocks with an untied and a tied head.
ARCHS = {"gpt3": [], "llama_untied": [*LLAMA, "model.tie_embeddings=false"], "llama_tied": LLAMA}
ARCH = pytest.mark.parametrize("arch", list(ARCHS))


def small(*extra, arch="gpt3"):
    return load_config(None, SMALL + ARCHS[arch] + list(extra)).model


@pytest.mark.parametrize(("scan", "arch"), [(True, "gpt3"), (False, "gpt3"), (True, "llama_untied")])
def test_causality(scan, arch):
    cfg = small(f"model.scan_blocks={str(scan).lower()}", arch=arch)
    model = StageModel(cfg, n_layers=4, first=True, last=True)
    params = init_stage_params(cfg, 0, range(4), True, True)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64)
    base = model.apply({"params": params}, tokens)
    t = 9
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % 64)
    out = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(np.asarray(out[:, :t]), np.asarray(base[:, :t]))  # exactly unchanged
    assert not np.allclose(out[:, t:], base[:, t:])


@pytest.mark.parametrize(("scan", "arch"), [(True, "gpt3"), (False, "gpt3"), (True, "llama_untied"),
                                            (False, "llama_tied")])
def test_stages_chained_equal_the_whole_model(scan, arch):
    cfg = small(f"model.scan_blocks={str(scan).lower()}", arch=arch)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
    whole = StageModel(cfg, 4, True, True).apply(
        {"params": init_stage_params(cfg, 0, range(4), True, True)}, tokens)
    x = tokens
    for layers, first, last in [(range(0, 1), True, False), (range(1, 3), False, False), (range(3, 4), False, True)]:
        p = init_stage_params(cfg, 0, layers, first, last)
        x = StageModel(cfg, len(layers), first, last).apply({"params": p}, x)
    np.testing.assert_allclose(np.asarray(x), np.asarray(whole), rtol=1e-5, atol=1e-5)


@ARCH
def test_stage_param_layout_matches_flax_init(arch):
    cfg = small(arch=arch)
    for first, last in [(True, False), (False, False), (False, True), (True, True)]:
        model = StageModel(cfg, 2, first, last)
        x = jnp.zeros((1, 16), jnp.int32) if first else jnp.zeros((1, 16, 32))
        shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)["params"]
        ours = init_stage_params(cfg, 0, range(1, 3), first, last)
        assert jax.tree.structure(ours) == jax.tree.structure(shapes)
        assert jax.tree.map(lambda a: a.shape, ours) == jax.tree.map(lambda a: a.shape, shapes)


def test_per_layer_layout_is_independent_of_scan():
    scanned, unrolled = small(), small("model.scan_blocks=false")
    a = flatten_per_layer(scanned, range(4), True, True, init_stage_params(scanned, 0, range(4), True, True))
    b = flatten_per_layer(unrolled, range(4), True, True, init_stage_params(unrolled, 0, range(4), True, True))
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]))
    # Re-assembling from the per-layer pieces gives back the stage tree.
    layers = [init_layer(scanned, 0, i) for i in range(4)]
    tree = assemble_stage_params(scanned, layers, embedding=init_embedding(scanned, 0),
                                 final_ln=init_final_ln(scanned), wte=None)
    assert jax.tree.all(jax.tree.map(jnp.array_equal, tree, init_stage_params(scanned, 0, range(4), True, True)))


@ARCH
def test_param_count_matches_the_tree(arch):
    cfg = small(arch=arch)
    params = init_stage_params(cfg, 0, range(4), True, True)
    assert sum(x.size for x in jax.tree.leaves(params)) == param_count(cfg)
    # Per stage too: the last stage's tied copy of `wte`, or the untied head's own matrix.
    ranges = [(0, 1), (1, 4)]
    for (a, b), n in zip(ranges, stage_param_counts(cfg, ranges), strict=True):
        tree = init_stage_params(cfg, 0, range(a, b), a == 0, b == 4)
        assert sum(x.size for x in jax.tree.leaves(tree)) == n
    xl = load_config(None, ["model.preset=xl"]).model
    assert 1.31e9 < param_count(xl) < 1.32e9  # GPT-3 XL: 1.316 B with vocabulary 50257


def test_llama_presets_have_the_released_models_sizes():
    """Parameter counts of the released checkpoints (their safetensors' tensor sizes summed)."""
    assert param_count(load_config(None, ["model.preset=tinyllama-1.1b"]).model) == 1_100_048_384
    assert param_count(load_config(None, ["model.preset=llama-3.2-1b"]).model) == 1_235_814_400
    assert param_count(load_config(None, ["model.preset=llama-3.2-3b"]).model) == 3_212_749_824


@pytest.mark.parametrize("arch", ["gpt3", "llama_untied"])
def test_remat_does_not_change_values(arch):
    cfg, remat = small(arch=arch), small("model.remat=block", arch=arch)
    tokens = jax.random.randint(jax.random.PRNGKey(3), (2, 16), 0, 64)
    params = init_stage_params(cfg, 0, range(4), True, True)

    def grads(c):
        m = StageModel(c, 4, True, True)
        return jax.grad(lambda p: m.apply({"params": p}, tokens).sum())(params)

    # (rounding: atol relative to each gradient's scale, which LLaMA's larger logits grow to ~50)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * max(1.0, float(abs(a).max()))),
                 grads(cfg), grads(remat))


# ---- float16 on CPU ------------------------------------------------------------------------------------


def _qkv(dtype, seed=4):
    return [jax.random.normal(k, (2, 16, 4, 8)).astype(dtype) for k in jax.random.split(jax.random.PRNGKey(seed), 3)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cpu_float16_attention_is_jax_attention_without_the_dot_algorithm(dtype):
    """The attention float16 uses on CPU is JAX's XLA attention step for step: with inputs for which
    JAX names no dot algorithm CPU lacks, its forward is JAX's bit for bit, its gradients to rounding."""
    q, k, v = _qkv(dtype)
    ours = gpt._float32_logits_attention
    jax_xla = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")  # noqa: E731
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(q, k, v)), np.asarray(jax.jit(jax_xla)(q, k, v)))

    def grads(f):
        return jax.jit(jax.grad(lambda *a: f(*a).astype(jnp.float32).sum(), argnums=(0, 1, 2)))(q, k, v)

    tol = float(jnp.finfo(dtype).eps) * 4
    for a, b in zip(grads(ours), grads(jax_xla), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=tol, atol=tol)


def test_float16_attention_on_gpu_is_jax_own(monkeypatch):
    """Only CPU takes the float32-logits path: where the backend is a GPU, float16 attention is
    JAX's, with its F16_F16_F32 dot algorithm, which is exactly what XLA's CPU backend refuses."""
    q, k, v = _qkv("float16")
    monkeypatch.setattr(gpt.jax, "default_backend", lambda: "gpu")
    with pytest.raises(ValueError, match="The precision 'F16_F16_F32' is not supported by dot_general on CPU"):
        jax.block_until_ready(jax.jit(lambda *a: gpt.causal_attention(*a, "xla"))(q, k, v))


def test_float16_model_trains_on_cpu_close_to_float32():
    """The whole model in float16 compiles and differentiates on CPU; its loss and gradients are
    float32's to float16's precision (11-bit significands: ~5e-4 per rounding)."""
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 17), 0, 64)
    params = init_stage_params(small(), 0, range(4), True, True)

    def loss_and_grads(cfg):
        model = StageModel(cfg, 4, True, True)
        loss = lambda p: next_token_loss(model.apply({"params": p}, tokens[:, :-1]), tokens[:, 1:])  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(params)

    (l32, g32), (l16, g16) = loss_and_grads(small()), loss_and_grads(small("model.dtype=float16"))
    assert l16.dtype == jnp.float32 and {g.dtype for g in jax.tree.leaves(g16)} == {jnp.dtype(jnp.float32)}
    assert float(l16) == pytest.approx(float(l32), rel=5e-4)  # measured: 5e-7
    assert float(l16) != float(l32)  # computed in float16, not silently in float32
    for path, a in jax.tree_util.tree_leaves_with_path(g32):
        b = g16
        for key in path:
            b = b[key.key]
        err = float(jnp.linalg.norm(b - a) / jnp.linalg.norm(a))
        assert err < 1e-2, (jax.tree_util.keystr(path), err)  # measured: up to 1.8e-3


@pytest.mark.parametrize(("dtype", "bound"), [("bfloat16", 3e-2), ("float16", 5e-3)])
def test_llama_half_precision_is_close_to_float32(dtype, bound):
    """LLaMA blocks in bfloat16 and float16 compute (grouped-query attention through CPU float16's own
    attention path), against float32 from the same parameters: the logits within the dtype's rounding."""
    f32, half = small("model.dtype=float32", arch="llama_untied"), small(f"model.dtype={dtype}", arch="llama_untied")
    params = init_stage_params(f32, 0, range(4), True, True)
    tokens = jax.random.randint(jax.random.PRNGKey(5), (2, 16), 0, 64)
    a = np.asarray(StageModel(f32, 4, True, True).apply({"params": params}, tokens))
    b = np.asarray(StageModel(half, 4, True, True).apply({"params": params}, tokens))
    assert b.dtype == np.float32 and np.isfinite(b).all()
    assert np.abs(a - b).max() / np.abs(a).max() < bound
