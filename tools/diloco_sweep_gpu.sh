#!/usr/bin/env bash
# The DiLoCo outer-settings sweep of issue 23 (BENCHMARKS.md "DiLoCo outer settings") on one lent GPU, in one
# <= 10-minute device call: tools/diloco_sweep.py processes side by side on the GPU, each (M, H) its own
# process (the (outer lr, momentum) grid and the M replicas vmapped inside it), the model (d_model 256,
# 9 layers: 7.3M parameters, 4.4x the tiny model), 1500 steps of configs/tiny_text.yaml's batch on the demo corpus.
# Needs the prepared corpus in runs/shakespeare (here: `jaxpipe demo-corpus` + `prepare-data`, then carry
# it: the device machine has no `tokenizers`). Results: runs/sw/*.jsonl, and $OUT/sw.tgz when OUT is set.
#   device run: bash tools/diloco_sweep_gpu.sh        (carry: runs/shakespeare)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
mkdir -p runs/sw
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
MODEL="--set model.d_model=256 --set model.n_layer=9 --steps 1500 --eval-every 300"
GRID="--lr 0.2 0.4 0.6 0.8 1.0 1.2 --momentum 0.0 0.5 0.9"
T=${T:-520}
go() {
  local name=$1; shift
  (timeout "$T" python3 tools/diloco_sweep.py $MODEL "$@" --out "runs/sw/$name.jsonl" > "runs/sw/$name.log" 2>&1
   echo "$name rc=$? ${SECONDS}s" >> runs/sw/progress) &
}
go m2h30 --M 2 --H 30 $GRID
go m2h100 --M 2 --H 100 $GRID
go m2h10 --M 2 --H 10 $GRID
go m4h30 --M 4 --H 30 $GRID
go m4h100 --M 4 --H 100 $GRID
go m4h10 --M 4 --H 10 $GRID
go m8 --M 8 --H 30 100 --lr 0.6 0.8 1.0 1.2 --momentum 0.0 0.9
go warm --M 2 4 --H 30 --warmup 150 --lr 0.4 0.6 0.8 1.0 --momentum 0.0 0.9
go inner --M 2 4 --H 30 --inner-lr 0.5 1.5 --lr 0.4 0.6 0.8 1.0 --momentum 0.0 0.9
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv
wait
cat runs/sw/progress
[ -n "${OUT:-}" ] && tar czf "$OUT/sw.tgz" runs/sw
python3 - <<'PY'
import glob, json
rows = [json.loads(line) for f in sorted(glob.glob("runs/sw/*.jsonl")) for line in open(f)]
best: dict = {}
for r in rows:
    if r["run"] == "exact":
        print("exact DP", round(r["final"], 4))
    else:
        k = (r["M"], r["H"], r["warmup"], r.get("inner_lr_scale", 1.0))
        if k not in best or r["vs_exact_pct"] < best[k]["vs_exact_pct"]:
            best[k] = r
print("(M, H, warm-up, inner lr scale): best outer lr, momentum, final vs exact DP")
for k, r in sorted(best.items()):
    print(k, r["outer_lr"], r["outer_momentum"], f"{r['vs_exact_pct']:+.2f} %")
PY
