"""A real training run end to end on CPU: prepared token files, evaluation, checkpoints, exact
resume, loading into other partitions, Hugging Face export and sampling.

One PP=2 run (4 steps, evaluation and a checkpoint every 2) is shared by the tests of this module;
the other tests resume from, load or export its checkpoints.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mpi_util import REPO, launch_once, run_mpi
from mpi_util import test_env as mpi_env
from test_prepare import corpus_files

from jaxpipe.cli import main
from jaxpipe.config import load_config
from jaxpipe.data.prepare import prepare_data
from jaxpipe.data.source import make_val_source, replica_sample_indices
from jaxpipe.model.gpt import StageModel, next_token_loss
from jaxpipe.pipeline.partition import Partition
from jaxpipe.train import checkpoint
from jaxpipe.train.evaluate import eval_batch_count
from jaxpipe.train.optimizer import Optimizer

pytestmark = pytest.mark.mpi

MODEL = ["model.n_layer=6", "model.d_model=64", "model.n_head=4", "model.seq_len=32", "model.vocab_size=320"]
TRAIN = ["train.global_batch_size=8", "train.micro_batch_size=2", "train.steps=4", "train.warmup_steps=1",
         "train.decay_steps=10", "train.lr=1e-2", "train.eps=1e-4", "train.eval_every=2", "train.eval_batches=2",
         "train.checkpoint_every=2", "train.keep_checkpoints=5", "data.source=tokens", "data.shuffle=true"]


def sets(items):
    return [a for item in items for a in ("--set", item)]


def metrics(path):
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    losses = {r["step"]: r["loss"] for r in rows if "loss" in r}
    return losses, {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def train(n, data, ckpt_dir, out, extra=(), resume=None):
    overrides = [*MODEL, *TRAIN, f"data.path={data}", f"train.checkpoint_dir={ckpt_dir}", *extra]
    args = ["-m", "jaxpipe", "train", *sets(overrides), "--metrics-out", str(out)]
    run = run_mpi(n, args + (["--resume", str(resume)] if resume else []), timeout=240)
    assert run.returncode == 0, run.stdout + run.stderr
    return run


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """PP=2, 4 steps uninterrupted: checkpoints after steps 2 and 4, validation after both (once per
    pytest run, whichever test asks first)."""

    def start(tmp):
        prepare_data(corpus_files(tmp), tmp / "data", vocab_size=300, log=lambda s: None)
        return train(2, tmp / "data", tmp / "ckpt", tmp / "metrics.jsonl", ["parallel.pp=2", "parallel.schedule=1f1b"])

    run, tmp = launch_once(tmp_path_factory, "training_run", start)
    assert run.returncode == 0, run.stdout + run.stderr
    return {"tmp": tmp, "data": tmp / "data", "ckpt": tmp / "ckpt", "run": run,
            "metrics": metrics(tmp / "metrics.jsonl")}


def test_run_logs_evaluates_and_checkpoints(straight):
    lines = straight["run"].stdout.splitlines()
    losses, val = straight["metrics"]
    assert sorted(losses) == [1, 2, 3, 4] and sorted(val) == [2, 4]
    assert any(line.startswith("eval     2 | val loss ") and "| val ppl " in line for line in lines)
    assert [s for s, _ in checkpoint.committed(straight["ckpt"])] == [2, 4]
    state = checkpoint.read_state(straight["ckpt"] / "step_00000002")
    assert state["samples_seen"] == 16 and len(state["partition"]) == 2 and state["partition"][-1][1] == 6
    assert (straight["ckpt"] / "step_00000002" / "tokenizer.json").is_file()


def test_resume_is_bit_identical(straight, tmp_path):
    """Stopped after step 2 and resumed: steps 3 and 4 (loss, validation, parameters) as if never stopped."""
    out = tmp_path / "metrics.jsonl"
    run = train(2, straight["data"], tmp_path / "ckpt", out, ["parallel.pp=2", "parallel.schedule=1f1b"],
                resume=straight["ckpt"] / "step_00000002")
    assert "resumed from" in run.stdout
    losses, val = metrics(out)
    ref_losses, ref_val = straight["metrics"]
    assert losses == {3: ref_losses[3], 4: ref_losses[4]}  # exact float equality
    assert val == {4: ref_val[4]}
    _, resumed = checkpoint.load_flat(tmp_path / "ckpt")
    _, reference = checkpoint.load_flat(straight["ckpt"] / "step_00000004")
    for k, v in reference.items():
        np.testing.assert_array_equal(resumed[k], v, err_msg=k)


def test_resume_into_another_partition(straight, tmp_path):
    """The PP=2 checkpoint (one chunk per rank) continues as PP=2 x DP=2 with two chunks per rank
    (interleaved 1F1B), another layer split and unrolled blocks, optimizer state included: losses,
    validation (each replica evaluates half the samples) and the parameters it saves agree to rounding
    (other partitions compile other programs, so bits may differ)."""
    out = tmp_path / "metrics.jsonl"
    train(4, straight["data"], tmp_path / "ckpt", out,
          ["parallel.pp=2", "parallel.dp=2", "parallel.schedule=interleaved_1f1b", "parallel.virtual_stages=2",
           "parallel.partition=[1,2,1,2]", "model.scan_blocks=false"],
          resume=straight["ckpt"] / "step_00000002")
    losses, val = metrics(out)
    ref_losses, ref_val = straight["metrics"]
    np.testing.assert_allclose([losses[3], losses[4], val[4]], [ref_losses[3], ref_losses[4], ref_val[4]], rtol=1e-5)
    _, resumed = checkpoint.load_flat(tmp_path / "ckpt")
    _, reference = checkpoint.load_flat(straight["ckpt"] / "step_00000004")
    assert resumed.keys() == reference.keys()
    for k, v in reference.items():
        np.testing.assert_allclose(resumed[k], v, rtol=0, atol=1e-5, err_msg=k)


def test_eval_loss_equals_single_process(straight):
    cfg = load_config(None, [*MODEL, *TRAIN, f"data.path={straight['data']}",
                             f"train.checkpoint_dir={straight['ckpt']}", "parallel.pp=2"])
    model, params = checkpoint.load_model(straight["ckpt"] / "step_00000002")
    val = make_val_source(cfg.data, cfg.model)
    n = eval_batch_count(cfg, val)
    idx = np.concatenate([replica_sample_indices(cfg, b, 0).ravel() for b in range(n)])
    s = val.samples(idx)
    logits = StageModel(model, n_layers=6, first=True, last=True).apply({"params": params}, jnp.asarray(s[:, :-1]))
    loss = float(next_token_loss(logits, jnp.asarray(s[:, 1:])))
    np.testing.assert_allclose(straight["metrics"][1][2], loss, rtol=2e-6)


def _stage_chain_logits(ckpt, counts, tokens, ranks=None, **overrides):
    """Logits of the model loaded as a pipeline with `counts` layers per chunk would load it: each
    rank its chunks at once (`ranks` pipeline ranks, chunk c on rank c mod ranks; default one chunk
    per rank), optimizer state included, then the chunks applied in order."""
    model = checkpoint.model_config(checkpoint.read_state(ckpt), **overrides)
    partition = Partition.from_counts(counts)
    ranks = ranks or len(counts)
    modules, loaded = {}, {}
    x = tokens
    for c in range(len(counts)):
        spec = partition.stage(c)
        modules[c] = StageModel(model, n_layers=spec.n_layers, first=spec.first, last=spec.last)
    templates = {}
    for c in range(len(counts)):  # shapes need the input each chunk sees
        templates[c] = jax.eval_shape(modules[c].init, jax.random.PRNGKey(0), x)["params"]
        x = jax.eval_shape(lambda p, xx, c=c: modules[c].apply({"params": p}, xx), templates[c], x)
    for r in range(ranks):
        chunks = range(r, len(counts), ranks)
        zeros = {c: jax.tree.map(lambda t: jnp.zeros(t.shape, t.dtype), templates[c]) for c in chunks}
        opt_template = Optimizer(load_config().train).init(zeros)
        params, opt = checkpoint.load_rank(ckpt, model, {c: partition.stage(c) for c in chunks},
                                           {c: templates[c] for c in chunks}, opt_template)
        assert int(opt[0].count) == 4  # Adam's update counter came back with the moments
        loaded.update(params)
    x = tokens
    for c in range(len(counts)):
        x = modules[c].apply({"params": loaded[c]}, x)
    return np.asarray(x)


def test_checkpoint_loads_into_other_partitions(straight):
    ckpt = checkpoint.resolve(straight["ckpt"])
    tokens = jnp.asarray(np.arange(64).reshape(2, 32) % 300, jnp.int32)
    model, params = checkpoint.load_model(ckpt)  # PP=1, scanned blocks
    whole = np.asarray(StageModel(model, n_layers=6, first=True, last=True).apply({"params": params}, tokens))
    for counts, ranks, overrides in [([3, 3], None, {}), ([1, 2, 2, 1], None, {"scan_blocks": False}),
                                     ([6], None, {"scan_blocks": False}), ([1, 2, 1, 2], 2, {})]:  # last: v = 2
        np.testing.assert_allclose(_stage_chain_logits(ckpt, counts, tokens, ranks, **overrides), whole, rtol=0,
                                   atol=2e-5, err_msg=str(counts))


def test_hf_export_matches(straight, tmp_path):
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    main(["export-hf", str(straight["ckpt"]), str(tmp_path / "hf")])
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = "Pipeline stages exchange activations."  # shorter than seq_len (32) in tokens
    ids = tok(text, return_tensors="pt").input_ids
    from jaxpipe.data.prepare import load_tokenizer

    assert ids[0].tolist() == load_tokenizer(straight["ckpt"] / "step_00000004" / "tokenizer.json").encode(text).ids
    with torch.no_grad():
        hf_logits = hf(ids).logits.numpy()
    model, params = checkpoint.load_model(straight["ckpt"])
    ours = StageModel(model, n_layers=6, first=True, last=True).apply({"params": params}, jnp.asarray(ids.numpy()))
    np.testing.assert_allclose(hf_logits, np.asarray(ours), rtol=0, atol=1e-4)


def test_generate(straight, capsys):
    args = ["generate", str(straight["ckpt"]), "--prompt", "The pipeline", "--max-new-tokens", "8"]
    main([*args, "--greedy"])
    greedy = capsys.readouterr().out
    assert greedy.startswith("The pipeline")
    main([*args, "--greedy"])
    assert capsys.readouterr().out == greedy  # deterministic
    main([*args, "--top-k", "5", "--temperature", "0.8", "--seed", "1"])
    assert capsys.readouterr().out.startswith("The pipeline")


KILL_CHILD = """
import sys
from jaxpipe.train import checkpoint
from jaxpipe.config import ModelConfig
from jaxpipe.model.layout import init_stage_params
from jaxpipe.train.optimizer import Optimizer
from jaxpipe.config import TrainConfig
from jaxpipe.pipeline.partition import StageSpec

model = ModelConfig(n_layer=2, d_model=32, n_head=2, seq_len=8, vocab_size=64)
spec = StageSpec(0, 1, 0, 2)
params = init_stage_params(model, 0, range(2), True, True)
opt = Optimizer(TrainConfig()).init({0: params})
for step in (1, 2):
    checkpoint.save(sys.argv[1], step, comm=checkpoint.OneProcess(), writer=True, model=model, specs={0: spec},
                    params={0: params}, opt_state=opt, state={"config": {"model": model.__dict__}}, keep=3,
                    pause_before_commit=0 if step == 1 else 60)
    print("saved", step, flush=True)
"""


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "ckpt"
    proc = subprocess.Popen([sys.executable, "-c", KILL_CHILD, str(root)], cwd=REPO, env=mpi_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not (root / "step_00000002.tmp" / checkpoint.STATE_FILE).exists():  # step 2 is half written
            assert proc.poll() is None and time.time() < deadline, proc.communicate()
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert [s for s, _ in checkpoint.committed(root)] == [1]
    assert checkpoint.resolve(root) == root / "step_00000001"
    model, params = checkpoint.load_model(root)
    assert model.n_layer == 2 and params["blocks"]["qkv"]["kernel"].shape == (2, 32, 3, 2, 16)
    with pytest.raises(Exception, match="never committed"):
        checkpoint.resolve(root / "step_00000002.tmp")
    # The next save cleans up what the killed one left.
    checkpoint.prune(root, keep=3)
    (root / "step_00000003").mkdir()
    (root / "step_00000003" / checkpoint.COMMIT_FILE).write_text("3\n")
    checkpoint.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000003"]
