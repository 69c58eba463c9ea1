#!/usr/bin/env bash
# The demo-corpus quality runs of BENCHMARKS.md (issues 12, 13, 18) in one batch: 4 runs of 4 ranks at a time,
# one XLA thread per rank, on a machine with 16+ cores and Open MPI (as run on the device machine, 2026-12-02).
# Needs runs/shakespeare (jaxpipe demo-corpus + prepare-data, see configs/tiny_text.yaml); results in runs/q/.
# `tools/quality_runs.sh LIST` runs the rows of the file LIST (name|flags per line) instead of the list below
# (tools/quality_int4.list: the int4 formats of issue 24).
export PYTHONPATH=$PWD
export JAX_PLATFORMS=cpu CUDA_VISIBLE_DEVICES= PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
export XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
which mpiexec; python3 -c "import mpi4py.MPI as M, jax, flax; print(M.Get_library_version()[:40], jax.__version__, flax.__version__)"
mkdir -p runs/q
PP4="--set parallel.pp=4"
DP="--set parallel.pp=2 --set parallel.dp=2"
if [ -n "$1" ]; then sed "s/\$PP4/$PP4/; s/\$DP/$DP/" "$1" > runs/q/list; else cat > runs/q/list <<LIST
pp4_float32|$PP4
pp4_bfloat16|$PP4 --set model.dtype=bfloat16
pp4_float16|$PP4 --set model.dtype=float16
pp4_delta_int4_int8|$PP4 --set parallel.act_codec=int4 --set parallel.act_delta=true --set parallel.act_grad_codec=int8
pp4_int4_int8|$PP4 --set parallel.act_codec=int4 --set parallel.act_grad_codec=int8
dp_none|$DP
dp_bfloat16|$DP --set parallel.grad_codec=bfloat16
dp_int8|$DP --set parallel.grad_codec=int8
dp_int4|$DP --set parallel.grad_codec=int4
dp_diloco10_int8|$DP --set parallel.dp_mode=diloco --set parallel.diloco_inner_steps=10 --set parallel.grad_codec=int8
dp_diloco50_int8|$DP --set parallel.dp_mode=diloco --set parallel.diloco_inner_steps=50 --set parallel.grad_codec=int8
LIST
fi
one() {
  name=${1%%|*}; args=${1#*|}
  [ -e runs/q/$name.done ] && return
  start=$(date +%s)
  mpiexec --allow-run-as-root --oversubscribe --bind-to none -x PYTHONPATH -x JAX_PLATFORMS -x CUDA_VISIBLE_DEVICES -x XLA_FLAGS -x JAX_COMPILATION_CACHE_DIR -x PYTHONUNBUFFERED -n 4 python3 -m jaxpipe train --config configs/tiny_text.yaml --set train.checkpoint_every=0 \
    --set train.log_every=50 $args --metrics-out runs/q/$name.jsonl > runs/q/$name.log 2>&1 && touch runs/q/$name.done
  echo "$name rc=$? $(( $(date +%s) - start )) s" >> runs/q/progress
}
export -f one
timeout ${QTIME:-520} bash -c 'cat runs/q/list | xargs -P 4 -I{} bash -c "one \"{}\""'
cat runs/q/progress
tar czf $OUT/q.tgz runs/q
