#!/usr/bin/env bash
# Runs groups of GPU benchmarks on the lent 4×H100 machine, appending JSON rows to $OUT/bench.jsonl
# and the console to $OUT/log.txt. Usage: bash tools/gpu_suite.sh GROUP [GROUP ...]
# Each run has its own time limit so one failure or hang does not cost the others.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
export NCCL_NVLS_ENABLE=0 JAX_LOG_COMPILES=${JAX_LOG_COMPILES:-0}
PY=${PY:-python3}
MPI=(mpirun --allow-run-as-root --oversubscribe --bind-to none -x PYTHONPATH -x PYTHONUNBUFFERED
     -x JAX_COMPILATION_CACHE_DIR -x XLA_PYTHON_CLIENT_MEM_FRACTION -x NCCL_NVLS_ENABLE -x JAX_LOG_COMPILES)
XL=(--config configs/gpt3_xl.yaml)
# The GPU pipeline setting: 1F1B with two extra warm-up forwards per stage (hides the per-message
# latency), the last stage's fused program with remat=dots (its no-remat compile takes minutes on H100).
XL1=("${XL[@]}" --set parallel.schedule=1f1b --set parallel.extra_warmup=2 --set "parallel.stage_remat=[none,none,none,dots]")
TRANSPORT=${TRANSPORT:-nccl}
TL=(--timeline "$OUT/timeline.jsonl")
# Two iterations dropped, not the original's one: the NCCL path's second iteration still carries one-time set-up.
LONG=(--iters 11 --skip 2) SHORT=(--iters 7 --skip 2)
log() { echo "== $(date +%T) $*" | tee -a "$OUT/log.txt"; }
run() {  # run LIMIT_S NPROCS LABEL ARGS...
  local limit=$1 n=$2 label=$3; shift 3
  log "$label"
  local rc
  if [ "$n" = 0 ]; then
    timeout "$limit" $PY tools/bench.py "$@" --label "$label" --json "$OUT/bench.jsonl" 2>&1 | tee -a "$OUT/log.txt" | grep -v Warning
    rc=${PIPESTATUS[0]}
  else
    timeout "$limit" "${MPI[@]}" -n "$n" $PY tools/bench.py "$@" --label "$label" --json "$OUT/bench.jsonl" \
      2>&1 | tee -a "$OUT/log.txt" | grep -E '^\[|^  |Error|error' | head -40
    rc=${PIPESTATUS[0]}
  fi
  [ "$rc" = 0 ] || log "$label: exit status $rc"
  return "$rc"
}
for group in "$@"; do
  case $group in
    env)
      log env; nvidia-smi -L | tee -a "$OUT/log.txt"
      $PY -c "import jax, flax, optax, mpi4py, yaml, cupy; print(jax.__version__, flax.__version__, optax.__version__, mpi4py.__version__, cupy.__version__, jax.devices())" 2>&1 | tail -2 | tee -a "$OUT/log.txt";;
    cache_load)  # a compilation cache carried from an earlier call (.jaxcache/jc.part.*), if any
      if ls .jaxcache/jc.part.* >/dev/null 2>&1; then cat .jaxcache/jc.part.* | tar xz -C "$(dirname "$JAX_COMPILATION_CACHE_DIR")" \
        && log "compilation cache loaded: $(ls "$JAX_COMPILATION_CACHE_DIR" | wc -l) entries"; fi;;
    cache_save)  # the compilation cache back to this machine in <= 4 parts of 15 MiB
      tar cz -C "$(dirname "$JAX_COMPILATION_CACHE_DIR")" "$(basename "$JAX_COMPILATION_CACHE_DIR")" > /tmp/jc.tgz
      if [ "$(stat -c %s /tmp/jc.tgz)" -le $((60 * 2**20)) ]; then split -b 15M /tmp/jc.tgz "$OUT/jc.part."; fi
      log "compilation cache $(du -h /tmp/jc.tgz | cut -f1)";;
    nccl_diag)  # the NCCL transport alone, then a small 1F1B pipeline over it; host-staged MPI if it fails
      run 40 2 transport-nccl transport --transport nccl --mib 8 32 --reps 10
      if ! run 75 4 tiny-1f1b-nccl pipeline --set parallel.schedule=1f1b --set parallel.extra_warmup=2 --set parallel.transport=nccl --set model.n_layer=8 --set model.d_model=1024 --set model.n_head=8 --set model.seq_len=1024 --set train.global_batch_size=32 --set train.micro_batch_size=2 --iters 4; then
        TRANSPORT=mpi; log "NCCL pipeline failed: the XL runs below use parallel.transport=mpi"
      fi;;
    transport)
      run 60 2 transport-mpi transport --transport mpi --mib 8 16 32
      run 60 2 transport-nccl transport --transport nccl --mib 8 16 32;;
    xl_mb4)
      JAX_LOG_COMPILES=1 run 240 4 pp4-mb4-1f1b-$TRANSPORT pipeline "${XL1[@]}" --set train.micro_batch_size=4 --set parallel.transport=$TRANSPORT "${TL[@]}" "${LONG[@]}";;
    xl_mb4_mpi)  # the same programs (cached) over host-staged MPI
      run 100 4 pp4-mb4-1f1b-mpi pipeline "${XL1[@]}" --set train.micro_batch_size=4 --set parallel.transport=mpi "${TL[@]}" "${SHORT[@]}";;
    xl_even)
      run 200 4 pp4-mb4-1f1b-$TRANSPORT-even pipeline "${XL1[@]}" --set train.micro_batch_size=4 --set parallel.transport=$TRANSPORT --set parallel.partition=even "${TL[@]}" "${SHORT[@]}";;
    xl_mb2)
      run 200 4 pp4-mb2-1f1b-$TRANSPORT pipeline "${XL1[@]}" --set train.micro_batch_size=2 --set parallel.transport=$TRANSPORT "${TL[@]}" "${SHORT[@]}";;
    xl_mb1)
      run 200 4 pp4-mb1-1f1b-$TRANSPORT pipeline "${XL1[@]}" --set train.micro_batch_size=1 --set parallel.transport=$TRANSPORT "${TL[@]}" "${SHORT[@]}";;
    xl_gpipe)
      run 200 4 pp4-mb4-gpipe-dots-$TRANSPORT pipeline "${XL[@]}" --set train.micro_batch_size=4 --set model.remat=dots --set parallel.transport=$TRANSPORT "${TL[@]}" "${SHORT[@]}";;
    xl_scan)
      run 200 4 pp4-mb4-1f1b-$TRANSPORT-scan pipeline "${XL1[@]}" --set train.micro_batch_size=4 --set parallel.transport=$TRANSPORT --set model.scan_blocks=true "${TL[@]}" "${SHORT[@]}";;
    repro_pp)  # issue 4: the original's PP table under link emulation (one launch for all six runs)
      timeout 300 $PY tools/reproduce_seed.py --platform gpu --tables pp --timeout 280 --json-out "$OUT/repro_pp.json" \
        2>&1 | tee -a "$OUT/log.txt" | grep -v Warning | tail -12;;
    repro_dp)  # issue 4: PP=2 x DP=2 with the central PS, 2 GPT-3 XL layers per stage
      timeout 300 $PY tools/reproduce_seed.py --platform gpu --tables dp --timeout 280 --json-out "$OUT/repro_dp.json" \
        2>&1 | tee -a "$OUT/log.txt" | grep -v Warning | tail -12;;
    repro_dp_50ms)  # the DP table's last row alone (with its calibration)
      timeout 170 $PY tools/reproduce_seed.py --platform gpu --tables dp --rows 4 --timeout 160 --json-out "$OUT/repro_dp_50ms.json" \
        2>&1 | tee -a "$OUT/log.txt" | grep -v Warning | tail -6;;
    xl_scan_mb1)
      run 110 4 pp4-mb1-1f1b-$TRANSPORT-scan pipeline "${XL1[@]}" --set train.micro_batch_size=1 --set parallel.transport=$TRANSPORT --set model.scan_blocks=true "${TL[@]}" "${SHORT[@]}";;
    xl_scan_mb2)
      run 100 4 pp4-mb2-1f1b-$TRANSPORT-scan pipeline "${XL1[@]}" --set train.micro_batch_size=2 --set parallel.transport=$TRANSPORT --set model.scan_blocks=true "${TL[@]}" "${SHORT[@]}";;
    single)
      run 110 0 single-mb4 single "${XL[@]}" --set parallel.pp=1 --set train.micro_batch_size=4 --iters 7 --skip 2;;
    spmd)
      run 150 1 spmd-pp1-4gpu pipeline "${XL[@]}" --set parallel.pp=1 --set runtime.devices_per_process=4 --set train.micro_batch_size=16 "${SHORT[@]}";;
    *) log "unknown group $group";;
  esac
done
log done
