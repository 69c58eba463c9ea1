"""The demo-corpus quality of pipeline codecs in one process, for machines where four ranks per run are
too slow (the CPU box: 39 min per 300-step PP=4 run): `tests/reference_codec.py` trains the whole model
with each codec's round trip applied at the PP=4 chunk boundaries (the single-process ground truth the
pipeline is tested equal to in tests/test_mpi.py), and the validation loss is taken the way the
pipeline's evaluation takes it (the activation codec at every boundary, the first `eval_batches` ×
`global_batch_size` windows of val.bin), and also with nothing quantised (`val_loss_unquantised`: the
trained model's own loss, as it serves after export).

    python tools/codec_quality.py --config configs/tiny_text.yaml --set parallel.pp=4 \\
        --codec none,none --codec int4_row,int4_row --codec int4,int4 --out runs/codec_quality.json

A codec named `int4_sr` rounds stochastically with each message's own noise (train.seed, replica, step,
micro-batch, direction, chunk), as the pipeline does: `--codec int4,int4_sr` (int4 activations, their
gradients rounded stochastically), `--codec int4_sr,int4_sr`; a third field sets act_int4_group.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def run_one(config: str, overrides: list[str], spec: str) -> dict:
    """One codec's 300-step run (or the config's train.steps): its validation losses."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from reference_codec import reference_train_codec, roundtrip

    from jaxpipe.config import load_config
    from jaxpipe.data.source import make_val_source
    from jaxpipe.model.gpt import StageModel, next_token_loss
    from jaxpipe.pipeline.costmodel import config_partition, config_schedule

    act, grad, *group = spec.split(",")
    extra = [f"parallel.act_codec={act}", f"parallel.act_grad_codec={grad}"]
    extra += [f"parallel.act_int4_group={group[0]}"] if group else []
    cfg = load_config(config, [*overrides, *extra])
    m, t = cfg.model, cfg.train
    ranges = config_partition(cfg, config_schedule(cfg)).ranges
    mods = [StageModel(m, n_layers=b - a, first=a == 0, last=b == m.n_layer) for a, b in ranges]
    rt = roundtrip(act, False, cfg.parallel.act_int4_group)
    val = make_val_source(cfg.data, m)
    assert val is not None
    n = t.eval_batches * t.global_batch_size
    batches = val.samples(np.arange(n)).reshape(t.eval_batches, t.global_batch_size, -1)

    def make_val_loss(boundary):
        @jax.jit
        def val_loss(params, tokens):
            x = tokens[:, :-1]
            for i, (mod, sp) in enumerate(zip(mods, params, strict=True)):
                x = mod.apply({"params": sp}, x)
                if i < len(mods) - 1:
                    x = boundary(x)
            return next_token_loss(x, tokens[:, 1:])
        return val_loss

    val_loss, val_loss_plain = make_val_loss(rt), make_val_loss(lambda x: x)
    evals: dict[int, float] = {}
    plain: dict[int, float] = {}  # the same parameters with nothing quantised: the trained model's own loss

    def after(step: int, params: list) -> None:
        if t.eval_every and step % t.eval_every == 0:
            evals[step] = float(np.mean([float(val_loss(params, jnp.asarray(b))) for b in batches]))
            plain[step] = float(np.mean([float(val_loss_plain(params, jnp.asarray(b))) for b in batches]))
            print(f"{spec}: step {step} val loss {evals[step]:.4f} (unquantised {plain[step]:.4f})", flush=True)

    start = time.time()
    losses, _, _ = reference_train_codec(cfg, ranges, after)
    return {"ranges": [list(r) for r in ranges], "val_loss": evals, "val_loss_unquantised": plain,
            "final_train_loss": losses[-1],
            "seconds": time.time() - start}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/tiny_text.yaml")
    ap.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[])
    ap.add_argument("--codec", action="append", required=True, metavar="ACT,GRAD[,GROUP]",
                    help="activation and gradient codec (and int4's act_int4_group), e.g. int4,int4_sr")
    ap.add_argument("--out", default="runs/codec_quality.json")
    args = ap.parse_args()
    results = {}
    for spec in args.codec:
        results[spec] = run_one(args.config, args.overrides, spec)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=1))
    base = next(iter(results.values()))
    for spec, r in results.items():
        last = max(r["val_loss"])
        print(f"{spec}: " + " ".join(f"{v:.4f}" for v in r["val_loss"].values())
              + f" | vs first: {100 * (r['val_loss'][last] / base['val_loss'][last] - 1):+.2f} %"
              + f" | unquantised {r['val_loss_unquantised'][last]:.4f}: "
              + f"{100 * (r['val_loss_unquantised'][last] / base['val_loss_unquantised'][last] - 1):+.2f} %")


if __name__ == "__main__":
    main()
