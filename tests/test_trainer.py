"""In-process training (one rank, PP=1): behaviour of the step loop itself."""

import jax

from jaxpipe.config import load_config
from jaxpipe.train import optimizer as optimizer_module
from jaxpipe.train.trainer import train


def test_every_program_compiles_once(monkeypatch):
    """Parameters, optimizer state and fresh gradient buffers are committed to the device from the
    start, as the programs' outputs are: a program first called with uncommitted and then with
    committed arguments compiles twice, which cost a GPT-3 XL stage ~8 s in its second step."""
    # Placement may set CUDA_VISIBLE_DEVICES in this process; later tests' mpiexec children must not inherit it.
    # (setenv, not delenv: monkeypatch undoes only what it recorded, and delenv of an unset name records nothing.)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    cfg = load_config(None, ["parallel.pp=1", "train.steps=3", "train.warmup_steps=1"])
    seen = {}
    original_init = optimizer_module.Optimizer.__init__

    def capture(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        seen["optimizer"] = self

    monkeypatch.setattr(optimizer_module.Optimizer, "__init__", capture)

    def probe(run, state):
        (program,) = run.programs.values()
        seen["program"] = program
        seen["committed"] = [x.committed for x in jax.tree.leaves(state.params)] + [
            x.committed for x in jax.tree.leaves(program.zero_grads(state.params[0]))]

    res = train(cfg, log=lambda s: None, probe=probe)
    assert len(res.losses) == 3
    # On GPU the transports and the optimizer return committed arrays, so anything uncommitted here
    # would meet a committed twin in the second step and be compiled for again.
    assert all(seen["committed"])
    assert seen["program"].forward_backward_loss._cache_size() == 1
    assert seen["optimizer"].update._cache_size() == 1
