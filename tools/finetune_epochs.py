"""Multi-epoch fine-tuning of an imported LLaMA at PP=4 over emulated links, per pipeline codec
(BENCHMARKS.md, "Fine-tuning over slow links"): validation loss per epoch, pipeline bytes per epoch and the
mean iteration, from each run's --metrics-out file.

    python tools/finetune_epochs.py --ckpt CKPT --data DIR --epochs 4 --out runs/ft-epochs [--set k=v ...]

Runs `mpiexec -n 4 jaxpipe train` once per case (none; act_delta + int4), with the validation after every
epoch (train.eval_every = steps per epoch) and data shuffled per epoch, then prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CASES = {
    "none": [],
    "act_delta + int4 (grad int8)": ["parallel.act_codec=int4", "parallel.act_delta=true",
                                     "parallel.act_grad_codec=int8"],
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ckpt", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    meta = json.loads((Path(args.data) / "meta.json").read_text())
    seq = json.loads((Path(args.ckpt) / "state.json").read_text())["config"]["model"]["seq_len"]
    per_epoch = ((meta["train"]["tokens"] - 1) // seq) // args.batch
    val_batches = max(1, ((meta["val"]["tokens"] - 1) // seq) // args.batch)
    base = [f"train.init_from={args.ckpt}", "parallel.pp=4", "data.source=tokens", f"data.path={args.data}",
            "data.shuffle=true", f"train.global_batch_size={args.batch}", "train.micro_batch_size=2",
            f"train.steps={per_epoch * args.epochs}", f"train.eval_every={per_epoch}",
            f"train.eval_batches={val_batches}", "network.delay_ms=10", "network.rate_gbit=1", *args.overrides]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (name, extra) in enumerate(CASES.items()):
        metrics = out / f"case{i}.jsonl"
        metrics.unlink(missing_ok=True)
        cmd = ["mpiexec", "-n", "4", sys.executable, "-m", "jaxpipe", "train", "--metrics-out", str(metrics),
               *(a for kv in [*base, *extra] for a in ("--set", kv))]
        log = subprocess.run(cmd, capture_output=True, text=True)
        (out / f"case{i}.log").write_text(log.stdout + log.stderr)
        if log.returncode:
            raise SystemExit(f"{name}: exit {log.returncode}\n{log.stderr[-3000:]}")
        steps = [json.loads(line) for line in metrics.read_text().splitlines()]
        train = [r for r in steps if "loss" in r]
        evals = {r["step"]: r["val_loss"] for r in steps if "val_loss" in r}
        for e in range(args.epochs):
            part = [r for r in train if e * per_epoch < r["step"] <= (e + 1) * per_epoch]
            val = evals.get((e + 1) * per_epoch, float("nan"))
            iters = [r["iter_time_s"] for r in part if r["step"] > 1]
            rows.append((name, e + 1, sum(r["loss"] for r in part) / len(part), val,
                         sum(r["pipe_bytes"] for r in part) / 1e6, sum(iters) / len(iters)))
        first = next(line for line in log.stdout.splitlines() if line.startswith("jaxpipe "))
        print(f"{name}: {first}", flush=True)
    print(f"\n{per_epoch} steps per epoch of {args.batch} x {seq} tokens\n")
    print("| pipeline codec | epoch | mean train loss | val loss after | pipeline MB | mean iteration s |")
    print("|---|---|---|---|---|---|")
    for name, e, tl, vl, mb, it in rows:
        print(f"| {name} | {e} | {tl:.4f} | {vl:.4f} | {mb:.2f} | {it:.3f} |")


if __name__ == "__main__":
    main()
