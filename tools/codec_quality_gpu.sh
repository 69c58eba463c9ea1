#!/usr/bin/env bash
# Issue 24's int4 quality on the demo corpus, PP = 4 boundaries, with tools/codec_quality.py (one process each,
# the whole model with each codec's round trip at the chunk boundaries: the reference the pipeline is tested
# equal to) on one lent GPU, float32 matrix products: the tiny model (seeds 0-3) and the model 4.4x its size
# (d_model 256, 9 layers; seeds 0-2), 300 steps each; every validation both through the codec (as the
# pipeline evaluates) and unquantised. Results: runs/cq/*.json, and $OUT/cq.tgz.
#   device run: bash tools/codec_quality_gpu.sh        (carry: runs/shakespeare)
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
mkdir -p runs/cq
CODECS="--codec none,none --codec int4,int4_sr,16 --codec int4,int4,32 --codec int4,int8,32"
BIG="parallel.pp=4 model.d_model=256 model.n_layer=9"
q() { local name=$1; shift; timeout "${T:-520}" python3 tools/codec_quality.py "$@" --out "runs/cq/$name.json" \
        > "runs/cq/$name.log" 2>&1; echo "$name rc=$?" >> runs/cq/progress; }
for s in 0 1 2; do q big_s$s --set $BIG train.seed=$s $CODECS & done
for s in 0 1 2 3; do q tiny_s$s --set parallel.pp=4 train.seed=$s $CODECS & done
wait
cat runs/cq/progress; grep "vs first" runs/cq/*.log | sed "s/runs.cq.//"
[ -n "${OUT:-}" ] && tar czf "$OUT/cq.tgz" runs/cq
