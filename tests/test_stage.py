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
