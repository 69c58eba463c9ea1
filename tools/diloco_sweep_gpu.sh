#!/usr/bin/env bash
# The DiLoCo outer-settings sweep of issue 23 (BENCHMARKS.md "DiLoCo outer settings") on one lent GPU, in one
# <= 10-minute device call: tools/diloco_sweep.py processes side by side on the GPU, each (M, H) its own
# process (the (outer lr, momentum) grid and the M replicas vmapped inside it), the model (d_model 256,
# 9 layers: 7.3M parameters, 4.4x the tiny model), 1500 steps of configs/tiny_text.yaml's batch on the demo corpus.
# Matrix products in TF32 (every run alike: the sweep compares DiLoCo with exact DP at one precision).
# As many processes at once as fit the card (a full 18-point grid at M = 4 holds ~25 GB: XLA's memory
# analysis); each stops at DEADLINE seconds after the start, its rows so far kept (a "diloco_partial" row per
# evaluation). Needs the prepared corpus in runs/shakespeare (here: `jaxpipe demo-corpus` + `prepare-data`,
# then carry it: the device machine has no `tokenizers`). Results: runs/sw/*.jsonl, and $OUT/sw.tgz.
#   device run: bash tools/diloco_sweep_gpu.sh        (carry: runs/shakespeare)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export JAX_DEFAULT_MATMUL_PRECISION=${JAX_DEFAULT_MATMUL_PRECISION:-tensorfloat32}
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export DEADLINE=$(( $(date +%s) + ${T:-520} ))
mkdir -p runs/sw
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv
python3 -c "import jax, flax, optax; print(jax.__version__, flax.__version__, optax.__version__, jax.devices())"
MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
P=${P:-$(( MIB / 1024 / 32 ))}; [ "$P" -lt 1 ] && P=1
echo "processes at once: $P"
MODEL="--set model.d_model=256 --set model.n_layer=9 --steps ${STEPS:-1500} --eval-every 300"
GRID="--lr 0.2 0.4 0.6 0.8 1.0 1.2 --momentum 0.0 0.5 0.9"
# JOBS=FILE runs that file's lines (name, then the tool's arguments) instead of the whole sweep below.
if [ -n "${JOBS:-}" ]; then cp "$JOBS" runs/sw/jobs; else cat > runs/sw/jobs <<JOBS
m2h30 --M 2 --H 30 $GRID
m4h30 --M 4 --H 30 $GRID
m2h100 --M 2 --H 100 $GRID
m4h100 --M 4 --H 100 $GRID
m8 --M 8 --H 30 100 --lr 0.6 0.8 1.0 1.2 --momentum 0.0 0.9
m2h10 --M 2 --H 10 $GRID
m4h10 --M 4 --H 10 $GRID
warm --M 2 4 --H 30 --warmup 150 --lr 0.4 0.6 0.8 1.0 --momentum 0.0 0.9
inner --M 2 4 --H 30 --inner-lr 0.5 1.5 --lr 0.4 0.6 0.8 1.0 --momentum 0.0 0.9
JOBS
fi
go() {
  local name=$1; shift
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -lt 60 ] && { echo "$name skipped: ${left}s left" >> runs/sw/progress; return; }
  local t0=$(date +%s)
  timeout "$left" python3 tools/diloco_sweep.py $MODEL "$@" --out "runs/sw/$name.jsonl" > "runs/sw/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t0 ))s" >> runs/sw/progress
}
export -f go; export MODEL
(sleep 90; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv) &
xargs -P "$P" -L 1 bash -c 'go "$@"' _ < runs/sw/jobs
cat runs/sw/progress
[ -n "${OUT:-}" ] && tar czf "$OUT/sw.tgz" runs/sw
python3 tools/diloco_sweep.py --summary runs/sw/*.jsonl
