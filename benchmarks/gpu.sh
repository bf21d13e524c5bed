#!/usr/bin/env bash
# One command for a GPU machine that has torch, triton and nvcc but no package index:
#   bash benchmarks/gpu.sh [results-dir]
# installs mvmae_fast offline with its CUDA kernels, runs the GPU correctness tests (every backend,
# fp32/fp16/bf16, every Triton kernel against its torch reference), then the benchmark suite,
# writing <results-dir>/<GPU name>.json and its Markdown/PNG report.
# The whole run takes ~17 minutes on an H100 (compiling the four compiled step cases is most of it);
# to split it: STAGES="install tests train" (default: all four, plus "bench") and BENCH_ARGS, the
# suite's pytest selection (default '-k cuda'), e.g. BENCH_ARGS='-k "cuda and vit_base"'.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${1:-benchmarks/results}"
mkdir -p "$results"
# The Python that holds torch (on the lent GPU machines a bare `pip` belongs to another interpreter).
py="${PYTHON:-python3}"
stages="${STAGES:-install tests train bench}"
has() { [[ " $stages " == *" $1 "* ]]; }

has install && MVMAE_FAST_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -e .
"$py" -c "import mvmae_fast._ext as e; assert e.cuda_compiled(), 'mvmae_fast._C was built without CUDA'"

# Native Triton for CUDA tensors (tests/conftest.py turns the interpreter on only if unset).
export TRITON_INTERPRET=0
# (in parallel where pytest-xdist is installed: the Triton compilations dominate, ~1.5 min on 16 cores)
parallel=()
"$py" -c "import xdist" 2>/dev/null && parallel=(-n 8)
has tests && "$py" -m pytest tests/test_cuda.py tests/test_cuda_kernels.py tests/test_autocast_triton_layers.py \
    -q -rs "${parallel[@]}"

# The training entrypoint on the GPU: a short MV-MAE run (bf16 autocast), eager and compiled, on the
# digits (scikit-learn's) or, where scikit-learn is not installed, the generated shapes.
if has train; then
    run_dir=$(mktemp -d)
    data=digits
    "$py" -c "import sklearn" 2>/dev/null || data=shapes
    quick=(--data "$data" --epochs 1 --max-batches-per-epoch 20 --probe-epochs 5 --knn-every 0)
    "$py" train/pretrain.py "${quick[@]}" --output-dir "$run_dir/eager"
    "$py" train/pretrain.py "${quick[@]}" --compile --output-dir "$run_dir/compiled"
    MVMAE_FAST_CUDA_AUTOCAST_LAYERS=1 "$py" train/pretrain.py "${quick[@]}" --output-dir "$run_dir/autocast_layers"
fi
has bench || exit 0

gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
if "$py" -c "import pytest_benchmark" 2>/dev/null; then
    # The CUDA cases only (the CPU ones measure this host's CPU, not the CPU results' machine).
    eval "extra=(${BENCH_ARGS:--k cuda})"
    "$py" -m pytest benchmarks/ --benchmark-only -q --benchmark-json "$results/$gpu.json" "${extra[@]}"
    "$py" benchmarks/report.py "$results/$gpu.json"
else
    echo "pytest-benchmark is not installed here: skipping the benchmark suite"
fi
