#!/usr/bin/env bash
# One prepared call on a GPU machine: the CUDA tests, the demo on the GPU, and the GPU benchmarks, each part
# under its own time limit, each writing its log under $OUT (default /tmp/gpu_check) as it goes.
#
#   bash benchmarks/gpu_check.sh                      # every part, in this order
#   bash benchmarks/gpu_check.sh tests splice         # some parts
#   DEV=cpu SMALL=1 PY=.venv/bin/python bash benchmarks/gpu_check.sh   # a dry run of the script itself, here
#
# Python packages the GPU image lacks travel as wheels in .whl/ (see BENCHMARKS.md, "GPU"); they are installed
# into /tmp/site and put first on PYTHONPATH with the package's src/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEV=${DEV:-cuda}
PY=${PY:-python3}
SMALL=${SMALL:-0}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_WAIT_POLICY=PASSIVE
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && [ "$DEV" != cpu ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if [ "$SMALL" = 1 ]; then  # the dry run: every command, at sizes a 2-core CPU runs in a few minutes
  SEED_SPLICE="--shape demo --batch 2 --seq 64"; TRAIN="--d-sae 2048 --batch 256 --steps 2 --warmup 1"
  ATTN="--shape tiny --batch 2 --seq 128 --repeats 2"; CAP="--tokens 20000 --repeats 1"; REPEATS=2
  CAP_PARTS="$CAP"; PROFILE="--tokens 512 --d-sae 4096 --repeats 2"; FEATS="--sentences 500 --repeats 2"
else
  SEED_SPLICE="--shape seed --batch 8 --seq 1024"; TRAIN="--batch 8192 --steps 20 --warmup 3"
  ATTN="--batch 8 --seq 1024 --repeats 10"
  CAP="--dim 3072 --layers 8 --heads 24 --kv-heads 8 --hook resid_post.7 --tokens 200000 --batch-tokens 32768 --repeats 3"
  CAP_PARTS="--dim 3072 --layers 8 --heads 24 --kv-heads 8 --hook resid_post.7 --tokens 100000 --batch-tokens 32768 --repeats 1"
  PROFILE=""; REPEATS=15; FEATS="--sentences 20000 --d-sae 16384 --k 32 --batch 256 --repeats 3"
fi

part() {  # part NAME SECONDS COMMAND...: run it under a time limit, log to $OUT/NAME.log, print its tail
  local name=$1 limit=$2
  shift 2
  echo "=== $name: start $(date -u +%H:%M:%S)"
  timeout "$limit" "$@" >>"$OUT/$name.log" 2>&1
  local rc=$?
  echo "=== $name: rc=$rc end $(date -u +%H:%M:%S)"
  grep -v '^{' "$OUT/$name.log" | tail -n "${TAIL:-6}"
}

for p in ${*:-tests splice train demo attention capture features}; do
  case $p in
    tests)
      { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1
        $PY -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda,
                torch.cuda.is_available() and torch.cuda.get_device_name())"; } >>"$OUT/tests.log" 2>&1
      LLAMA_SAE_TEST_GPU=$DEV part tests 200 $PY -m pytest -p no:cacheprovider tests/test_cuda.py -x -rs ;;
    splice)
      part splice 150 bash -c "$PY benchmarks/bench_splice.py --device $DEV --batch 8 --seq 128 --repeats $REPEATS \
        && $PY benchmarks/bench_splice.py --device $DEV --batch 64 --seq 128 --repeats $REPEATS --gen-tokens 0 \
        && $PY benchmarks/bench_splice.py --device $DEV $SEED_SPLICE --repeats $REPEATS" ;;
    splice_seed)  # the seed's shape alone
      part splice_seed 100 $PY benchmarks/bench_splice.py --device "$DEV" $SEED_SPLICE --repeats $REPEATS ;;
    train)
      part train 150 $PY benchmarks/bench_sae_seed.py --device "$DEV" $TRAIN --peers sparsify ;;
    demo)
      rm -rf /tmp/demo_gpu
      TAIL=40 part demo 240 $PY -m llama_sae.cli demo --device "$DEV" --out /tmp/demo_gpu
      cp /tmp/demo_gpu/report.json "$OUT/demo_report.json" 2>/dev/null ;;
    attention)
      part attention 60 $PY benchmarks/bench_attention.py --device "$DEV" $ATTN ;;
    capture)
      part capture 120 $PY benchmarks/bench_capture.py --device "$DEV" $CAP --overhead-only ;;
    features)
      part features 120 $PY benchmarks/bench_features.py --device "$DEV" $FEATS ;;
    components)  # capture's CPU-side costs per token at the GPU shape
      TAIL=12 part components 120 $PY benchmarks/bench_capture.py --device "$DEV" $CAP_PARTS ;;
    profile)
      TAIL=80 part profile 150 $PY benchmarks/profile_gpu.py --device "$DEV" $PROFILE ;;
    *) echo "unknown part $p (tests splice splice_seed train demo attention capture features components profile)"; exit 2 ;;
  esac
done
