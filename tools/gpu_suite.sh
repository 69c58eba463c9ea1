#!/usr/bin/env bash
# Runs groups of GPU benchmarks on the lent 4×H100 machine, appending JSON rows to $OUT/bench.jsonl
# and the console to $OUT/log.txt. Usage: bash tools/gpu_suite.sh GROUP [GROUP ...]
# Each run has its own time limit so one failure or hang does not cost the others.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export NCCL_NVLS_ENABLE=0
PY=${PY:-python3}
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x PYTHONPATH -x PYTHONUNBUFFERED
     -x JAX_COMPILATION_CACHE_DIR -x XLA_PYTHON_CLIENT_MEM_FRACTION -x NCCL_NVLS_ENABLE)
XL=(--config configs/gpt3_xl.yaml)
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
run() {  # run LIMIT_S NPROCS LABEL ARGS...
  local limit=$1 n=$2 label=$3; shift 3
  log "$label"
  if [ "$n" = 0 ]; then
    timeout "$limit" $PY tools/bench.py "$@" --label "$label" --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/log.txt" | grep -v Warning
  else
    timeout "$limit" "${MPI[@]}" -n "$n" $PY tools/bench.py "$@" --label "$label" --json "$OUT/bench.jsonl" \
      2>&1 | tee -a "$OUT/log.txt" | grep -E '^\[|^  |Error|error' | head -40
  fi
}
for group in "$@"; do
  case $group in
    env)
      log env; nvidia-smi -L | tee -a "$OUT/log.txt"
      $PY -c "import jax, flax, optax, mpi4py, yaml, cupy; print(jax.__version__, flax.__version__, optax.__version__, mpi4py.__version__, cupy.__version__, jax.devices())" 2>&1 | tail -2 | tee -a "$OUT/log.txt";;
    nccl_diag)  # the NCCL transport alone, then a small 1F1B pipeline over it, each under a short limit
      run 45 2 transport-nccl transport --transport nccl --mib 8 32 --reps 10
      run 90 4 tiny-1f1b-nccl pipeline --set parallel.schedule=1f1b --set parallel.transport=nccl --set model.n_layer=8 --set model.d_model=1024 --set model.n_head=8 --set model.seq_len=1024 --set train.global_batch_size=32 --set train.micro_batch_size=2;;
    xl_mb4_dots)
      run 150 4 pp4-mb4-1f1b-dots-nccl pipeline "${XL[@]}" --set train.micro_batch_size=4 --set parallel.schedule=1f1b --set model.remat=dots --set parallel.transport=nccl;;
    transport)
      run 120 2 transport-mpi transport --transport mpi --mib 8 16 32
      run 120 2 transport-nccl transport --transport nccl --mib 8 16 32;;
    xl_mb4)  # the main configuration, then the same programs (cached) over host-staged MPI
      run 170 4 pp4-mb4-1f1b-nccl pipeline "${XL[@]}" --set train.micro_batch_size=4 --set parallel.schedule=1f1b --set parallel.transport=nccl
      run 120 4 pp4-mb4-1f1b-mpi pipeline "${XL[@]}" --set train.micro_batch_size=4 --set parallel.schedule=1f1b --set parallel.transport=mpi;;
    xl_even)
      run 150 4 pp4-mb4-1f1b-nccl-even pipeline "${XL[@]}" --set train.micro_batch_size=4 --set parallel.schedule=1f1b --set parallel.transport=nccl --set parallel.partition=even;;
    xl_mb2)
      run 150 4 pp4-mb2-1f1b-nccl pipeline "${XL[@]}" --set train.micro_batch_size=2 --set parallel.schedule=1f1b --set parallel.transport=nccl;;
    xl_mb1)
      run 170 4 pp4-mb1-1f1b-nccl pipeline "${XL[@]}" --set train.micro_batch_size=1 --set parallel.schedule=1f1b --set parallel.transport=nccl;;
    xl_gpipe)
      run 150 4 pp4-mb4-gpipe-dots-nccl pipeline "${XL[@]}" --set train.micro_batch_size=4 --set model.remat=dots --set parallel.transport=nccl;;
    xl_scan)
      run 150 4 pp4-mb4-1f1b-nccl-scan pipeline "${XL[@]}" --set train.micro_batch_size=4 --set parallel.schedule=1f1b --set parallel.transport=nccl --set model.scan_blocks=true;;
    single)
      run 150 0 single-mb4 single "${XL[@]}" --set parallel.pp=1 --set train.micro_batch_size=4 --iters 6;;
    spmd)
      run 150 1 spmd-pp1-4gpu pipeline "${XL[@]}" --set parallel.pp=1 --set runtime.devices_per_process=4 --set train.micro_batch_size=16;;
    *) log "unknown group $group";;
  esac
done
log done
