#!/usr/bin/env bash
# Every GPU row of the README's benchmark table, in one go, on one CUDA device (about 8-10 minutes on an H200):
#   bash benchmarks/gpu_all.sh [OUT_DIR]        # prints each benchmark and keeps its output in OUT_DIR
# First the CUDA equality tests (the fixed-layout and compiled steps against the CPU's flat step). Rows: parsing
# (bulk vs one call each, batched vs Stanza's decoder), one Flickr30K-sized epoch (ms per batch and GPU-busy share
# before/after the fixed layout and with CUDA graphs, peak memory and its breakdown; then the epoch compiled),
# scoring a 1,000 x 5,000 split against the device's matmul rate, and region extraction vs the bare detector on
# the demo photos and on the Flickr size mix.
set -u
cd "$(dirname "$0")/.."
out="${1:-${OUT:-/tmp/defrag-gpu-bench}}"
mkdir -p "$out"
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" \
  || exit 2
status=0
run() {  # name, timeout in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | grep -v '^\s*$' | tail -40
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "=== $name failed (exit $rc)"; status=1; }
}
run cuda-tests 300 python -m pytest -q -p no:cacheprovider tests/test_step.py tests/test_objective.py tests/test_train.py \
  -k "cuda or gpu"
run objective 120 python benchmarks/bench_objective.py --device cuda --loop-pairs 5
run scoring 120 python benchmarks/bench_scoring.py --device cuda --h 1000 --repeat 3
run epoch 540 python benchmarks/bench_epoch.py --device cuda --no-progress --cache-dir "${EPOCH_CACHE:-/tmp/defrag-bench-epoch}"
run epoch-compiled 300 python benchmarks/bench_epoch.py --device cuda --no-progress --compile --profile-steps 0 \
  --cache-dir "${EPOCH_CACHE:-/tmp/defrag-bench-epoch}"
run parse 240 python benchmarks/bench_parse.py --device cuda --n 3000 --n-single 300
run regions-flickr 240 python benchmarks/bench_regions.py --device cuda --detector torchvision-r50-fpn-v2 --n 64 \
  --batch-size 8 --amp --size-mix flickr --repeat 2
run regions-demo 240 python benchmarks/bench_regions.py --device cuda --detector torchvision-r50-fpn-v2 --n 32 \
  --batch-size 8 --amp --repeat 2
exit $status
