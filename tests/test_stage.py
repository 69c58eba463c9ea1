"""A chunk's programs: packed residuals cross as a few arrays and change no value."""

import jax
import numpy as np

from jaxpipe.config import load_config
from jaxpipe.model.layout import init_stage_params
from jaxpipe.pipeline import stage as stage_module
from jaxpipe.pipeline.partition import Partition
from jaxpipe.pipeline.stage import StageProgram


def _run(split: bool):
    cfg = load_config(None, ["parallel.pp=3", "model.n_layer=6", "model.d_model=32", "model.n_head=4",
                             "model.seq_len=16", "model.vocab_size=64", "model.scan_blocks=false"])
    spec = Partition.from_counts([2, 2, 2]).stage(1)  # a middle stage: input and output activations
    prog = StageProgram(cfg.model, spec, micro_batch_size=2, split=split)
    params = prog.place_params(init_stage_params(cfg.model, 0, spec.layers, False, False))
    x = jax.random.normal(jax.random.PRNGKey(1), prog.act_spec.shape)
    g_y = jax.random.normal(jax.random.PRNGKey(2), prog.act_spec.shape)
    y, saved = prog.forward(params, x)
    grads = prog.zero_grads(params)
    if split:
        g_x, w = prog.backward_input(saved, g_y)
        grads = prog.backward_weight(grads, params, w)
        carried = len(jax.tree.leaves(saved)) + len(jax.tree.leaves(w))
    else:
        grads, g_x = prog.backward(grads, saved, g_y)
        carried = len(jax.tree.leaves(saved))
    return [np.asarray(v) for v in (y, g_x, *jax.tree.leaves(grads))], carried


def test_packed_residuals_change_nothing(monkeypatch):
    """The split backward carries both packed trees (F -> I and I -> W); the full backward's packing is
    pinned by the unrolled layouts of tests/test_mpi.py, which equal the single process."""
    plain, n_plain = _run(split=True)  # the default: residuals cross as arrays
    monkeypatch.setattr(stage_module._Packer, "MIN_LEAVES", 16)  # pack trees of 16 leaves or more
    packed, n_packed = _run(split=True)
    assert n_packed <= 8 < n_plain, (n_packed, n_plain)  # a few buffers instead of dozens of arrays
    for a, b in zip(packed, plain, strict=True):
        np.testing.assert_array_equal(a, b)


def test_llama_split_backward_equals_the_full_backward():
    """zb_h1's split backward (input gradient, then weight gradient from the recorded inputs) on LLaMA
    blocks and the untied head gives the full backward's gradients: every parametrised op of the block
    (q, kv, proj, gate_up, down, both RMSNorms) and the stage's head is recorded."""
    cfg = load_config(None, ["parallel.pp=2", "model.arch=llama", "model.n_layer=4", "model.d_model=32",
                             "model.n_head=4", "model.n_kv_head=2", "model.d_ff=48", "model.seq_len=16",
                             "model.vocab_size=64", "model.tie_embeddings=false"])
    spec = Partition.from_counts([2, 2]).stage(1)  # the last stage: blocks, RMSNorm, untied head, loss
    out = {}
    for split in (False, True):
        prog = StageProgram(cfg.model, spec, micro_batch_size=2, split=split)
        params = prog.place_params(init_stage_params(cfg.model, 0, spec.layers, False, True))
        x = jax.random.normal(jax.random.PRNGKey(1), prog.act_spec.shape)
        targets = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 64)
        grads = prog.zero_grads(params)
        scale = np.float32(1.0)
        if split:
            g_x, loss, w = prog.forward_input_loss(params, x, targets, scale)
            grads = prog.backward_weight(grads, params, w)
        else:
            grads, g_x, loss = prog.forward_backward_loss(params, grads, x, targets, scale)
        out[split] = [np.asarray(v) for v in (loss, g_x, *jax.tree.leaves(grads))]
    assert len(out[True]) == len(out[False])
    for a, b in zip(out[True], out[False], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
