"""DiLoCo's outer learning rate and momentum, swept against exact data parallelism at equal tokens.

One process simulates M replicas (no MPI, no pipeline): the rules are tests/reference.py's
`reference_diloco` (the independent DiLoCo the MPI runs equal to 1e-7), made fast enough for a sweep
by `jax.vmap` over replicas *and* over the (outer lr, momentum) grid, and `lax.scan` over the H
inner steps of a round, so one compiled program runs every configuration of an (M, H) at once.

- exact DP is one model on the whole global batch (the replicas' mean gradient, clipped once: what
  the exact modes compute), every step;
- DiLoCo: replica r trains on rows [r·B/M, (r+1)·B/M) of every global batch with its own AdamW (and
  clipping); after each H steps g = mean_r(outer - local_r), m = mu·m + g, outer -= lr·(g + mu·m),
  every replica continues from outer; the last step always syncs;
- `--warmup K`: exact DP for the first K steps (the same tokens), then DiLoCo from that model and its
  AdamW state (a question for the sweep only: the trainer has no such option, since the measured warm
  start did not close the gap; BENCHMARKS.md "DiLoCo on the tiny model, CPU").

Every line of `--out` is one run: validation loss every `--eval-every` steps on the outer model, the
final one, and its increase over exact DP (and a "diloco_partial" row per evaluation, so a run cut short
still compares at equal tokens). `--summary FILE...` prints the tables. Example (the BENCHMARKS.md table):

    python tools/diloco_sweep.py --config configs/tiny_text.yaml --set model.d_model=256 \
        --set model.n_layer=9 --steps 1500 --M 2 --H 30 100 --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, Any, np.ndarray, np.ndarray, Any]:
    from jaxpipe.config import load_config
    from jaxpipe.data.source import global_batch, make_source, make_val_source
    from jaxpipe.model.gpt import StageModel, next_token_loss
    from jaxpipe.model.layout import init_stage_params
    from jaxpipe.train.optimizer import make_adamw

    cfg = load_config(args.config or None, [*args.set, f"train.steps={args.steps}", f"train.decay_steps={args.steps}",
                                    "parallel.pp=1", "parallel.dp=1"])
    m = cfg.model
    model = StageModel(m, n_layers=m.n_layer, first=True, last=True)
    init = init_stage_params(m, cfg.train.seed, range(m.n_layer), True, True)
    tx = optax.chain(optax.clip_by_global_norm(cfg.train.grad_clip), make_adamw(cfg.train))
    source = make_source(cfg.data, m)
    batches = [global_batch(source, cfg, s) for s in range(args.steps)]
    xs = np.stack([b[0] for b in batches]).astype(np.int32)
    ys = np.stack([b[1] for b in batches]).astype(np.int32)
    val = make_val_source(cfg.data, m)
    assert val is not None, "the sweep needs a validation stream"
    v = val.samples(np.arange(args.val_samples))

    def loss_fn(p: Any, x: jax.Array, y: jax.Array) -> jax.Array:
        return next_token_loss(model.apply({"params": p}, x), y)

    @jax.jit
    def evaluate(p: Any) -> jax.Array:
        parts = [loss_fn(p, v[i:i + 16, :-1], v[i:i + 16, 1:]) for i in range(0, len(v), 16)]
        return jnp.mean(jnp.stack(parts))

    return cfg, init, tx, loss_fn, xs, ys, evaluate


def _inner_tx(cfg: Any, scale: float) -> Any:
    """The replicas' optimizer: the config's AdamW with its learning-rate schedule scaled by `scale`
    (a replica sees 1/M of the global batch, so its best step size need not be exact DP's)."""
    import dataclasses

    from jaxpipe.train.optimizer import make_adamw
    t = dataclasses.replace(cfg.train, lr=cfg.train.lr * scale, min_lr=cfg.train.min_lr * scale)
    return optax.chain(optax.clip_by_global_norm(t.grad_clip), make_adamw(t))


def _step(tx: Any, loss_fn: Any) -> Any:
    def step(p: Any, s: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, loss
    return step


def run_exact(args: argparse.Namespace, ctx: tuple, keep_at: set[int]) -> tuple[dict, dict[int, Any]]:
    _, init, tx, loss_fn, xs, ys, evaluate = ctx
    step = _step(tx, loss_fn)

    @jax.jit
    def chunk(p: Any, s: Any, x: jax.Array, y: jax.Array) -> tuple[Any, Any, jax.Array]:
        def body(c: Any, xy: Any) -> Any:
            p, s, loss = step(*c, *xy)
            return (p, s), loss
        (p, s), losses = jax.lax.scan(body, (p, s), (x, y))
        return p, s, losses

    p, s = init, tx.init(init)
    kept, evals, train = {}, {}, []
    k, every = 0, args.eval_every
    while k < args.steps:
        n = min(every - k % every, args.steps - k, *(w - k for w in keep_at if w > k))
        p, s, losses = chunk(p, s, xs[k:k + n], ys[k:k + n])
        train.extend(np.asarray(losses).tolist())
        k += n
        if k in keep_at:
            kept[k] = (p, s)
        if k % every == 0 or k == args.steps:
            evals[k] = float(evaluate(p))
    row = {"run": "exact", "val": evals, "final": evals[args.steps], "train_last100": float(np.mean(train[-100:]))}
    return row, kept


def run_diloco(args: argparse.Namespace, ctx: tuple, M: int, H: int, lrs: list[float], mus: list[float],
               start: tuple[Any, Any] | None, warmup: int, exact: dict, inner: float = 1.0,
               emit: Callable[[dict], None] | None = None) -> list[dict]:
    cfg, init, tx, loss_fn, xs, ys, evaluate = ctx
    tx = tx if inner == 1.0 else _inner_tx(cfg, inner)
    grid = [(lr, mu) for mu in mus for lr in lrs]
    C = len(grid)
    lr_c = jnp.array([g[0] for g in grid], jnp.float32)
    mu_c = jnp.array([g[1] for g in grid], jnp.float32)
    step = _step(tx, loss_fn)
    vstep = jax.vmap(jax.vmap(step), in_axes=(0, 0, None, None))  # configs, then replicas

    @partial(jax.jit, donate_argnums=(0, 1, 2, 3))
    def round_(P: Any, S: Any, outer: Any, mom: Any, x: jax.Array, y: jax.Array) -> Any:
        def body(c: Any, xy: Any) -> Any:
            P, S, loss = vstep(*c, *xy)
            return (P, S), loss.mean(axis=1)
        (P, S), losses = jax.lax.scan(body, (P, S), (x, y))

        def bc(v: jax.Array, leaf: jax.Array) -> jax.Array:
            return v.reshape((C,) + (1,) * (leaf.ndim - 1))
        g = jax.tree.map(lambda o, p: jnp.mean(o[:, None] - p, axis=1), outer, P)
        mom = jax.tree.map(lambda mm, gg: bc(mu_c, gg) * mm + gg, mom, g)
        outer = jax.tree.map(lambda o, gg, mm: o - bc(lr_c, gg) * (gg + bc(mu_c, gg) * mm), outer, g, mom)
        P = jax.tree.map(lambda o: jnp.broadcast_to(o[:, None], (C, M, *o.shape[1:])), outer)
        return P, S, outer, mom, losses

    p0, s0 = start if start is not None else (init, tx.init(init))
    rep = lambda t, n: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), t)  # noqa: E731
    P, S = rep(rep(p0, M), C), rep(rep(s0, M), C)
    outer = rep(p0, C)
    mom = jax.tree.map(jnp.zeros_like, outer)
    b = cfg.train.global_batch_size // M
    split = lambda a: a.reshape(a.shape[0], M, b, *a.shape[2:])  # noqa: E731
    evaluate_c = jax.jit(jax.vmap(evaluate))
    k, evals, train = warmup, {}, []
    while k < args.steps:
        n = min(H, args.steps - k)
        P, S, outer, mom, losses = round_(P, S, outer, mom, split(xs[k:k + n]), split(ys[k:k + n]))
        train.append(np.asarray(losses))
        k += n
        if k % args.eval_every == 0 or k == args.steps or (k // args.eval_every) != ((k - n) // args.eval_every):
            evals[k] = np.asarray(evaluate_c(outer)).tolist()
            if emit is not None and k < args.steps and k in exact["val"]:
                # a partial row per evaluation: a run cut short by its time limit still compares at equal tokens
                for c, (lr, mu) in enumerate(grid):
                    emit({"run": "diloco_partial", "M": M, "H": H, "outer_lr": lr, "outer_momentum": mu,
                          "warmup": warmup, "inner_lr_scale": inner, "step": k, "val_at_step": evals[k][c],
                          "vs_exact_pct": 100.0 * (evals[k][c] / exact["val"][k] - 1.0)})
    curve = np.concatenate(train, axis=0)  # [steps, configs]: the replicas' mean training loss per step
    tl = curve[-100:].mean(axis=0)
    out = []
    exact_final = exact["final"]
    for c, (lr, mu) in enumerate(grid):
        final = evals[args.steps][c]
        out.append({"run": "diloco", "M": M, "H": H, "outer_lr": lr, "outer_momentum": mu, "warmup": warmup,
                    "inner_lr_scale": inner,
                    "val": {k: v[c] for k, v in evals.items()}, "final": final, "train_last100": float(tl[c]),
                    "vs_exact_pct": 100.0 * (final / exact_final - 1.0), "train_losses": curve[:, c].tolist()})
    return out


def summary(files: list[str]) -> None:
    """The sweep's table from its `--out` files: each setting's final loss over exact DP's, or, for a run cut
    short, its latest evaluation over exact DP's at the same step (marked @step)."""
    rows = [json.loads(line) for f in files for line in Path(f).read_text().splitlines() if line.strip()]
    exact = sorted({round(r["final"], 4) for r in rows if r["run"] == "exact"})
    print("exact DP final validation loss:", ", ".join(map(str, exact)))
    cell: dict[tuple, dict[tuple, str]] = {}
    best: dict[tuple, tuple[float, str]] = {}
    for r in sorted(rows, key=lambda r: (r["run"] == "diloco", r.get("step", 0))):
        if r["run"] == "exact":
            continue
        key = (r["M"], r["H"], r["warmup"], r.get("inner_lr_scale", 1.0))
        at = "" if r["run"] == "diloco" else f" @{r['step']}"
        text = f"{r['vs_exact_pct']:+.2f} %{at}"
        cell.setdefault(key, {})[(r["outer_momentum"], r["outer_lr"])] = text
        if at == "" and (key not in best or r["vs_exact_pct"] < best[key][0]):
            best[key] = (r["vs_exact_pct"], f"lr {r['outer_lr']}, momentum {r['outer_momentum']}")
    for key, cells in sorted(cell.items()):
        lrs = sorted({lr for _, lr in cells})
        print(f"\nM = {key[0]}, H = {key[1]}, warm-up {key[2]}, inner lr x {key[3]}"
              + (f": best {best[key][1]} ({best[key][0]:+.2f} %)" if key in best else ": no final row"))
        print("| momentum | " + " | ".join(f"lr {lr}" for lr in lrs) + " |")
        print("|---" * (len(lrs) + 1) + "|")
        for mu in sorted({mu for mu, _ in cells}):
            print(f"| {mu} | " + " | ".join(cells.get((mu, lr), "–") for lr in lrs) + " |")


def main(argv: list[str] | None = None) -> None:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--summary"]:
        summary(argv[1:])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny_text.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--M", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--H", type=int, nargs="+", default=[10, 30, 100])
    ap.add_argument("--lr", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    ap.add_argument("--momentum", type=float, nargs="+", default=[0.0, 0.9])
    ap.add_argument("--warmup", type=int, nargs="+", default=[0], help="exact-DP steps before DiLoCo starts")
    ap.add_argument("--inner-lr", type=float, nargs="+", default=[1.0],
                    help="the replicas' learning rate as a multiple of train.lr (and min_lr)")
    ap.add_argument("--eval-every", type=int, default=300)
    ap.add_argument("--val-samples", type=int, default=192)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    t0 = time.time()
    ctx = _setup(args)
    with open(args.out, "a") as f:
        def emit(row: dict) -> None:
            row["elapsed_s"] = round(time.time() - t0, 1)
            f.write(json.dumps(row) + "\n")
            f.flush()
            print(json.dumps({k: row[k] for k in row if k not in ("val", "train_losses")}), flush=True)
        exact, kept = run_exact(args, ctx, {w for w in args.warmup if w > 0})
        emit(exact)
        for w in args.warmup:
            for inner in args.inner_lr:
                for M in args.M:
                    for H in args.H:
                        for row in run_diloco(args, ctx, M, H, args.lr, args.momentum, kept.get(w), w,
                                              exact, inner, emit):
                            emit(row)


if __name__ == "__main__":
    sys.exit(main())
