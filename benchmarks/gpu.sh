#!/usr/bin/env bash
# One command for a GPU machine that has torch, triton and nvcc but no package index:
#   bash benchmarks/gpu.sh [results-dir]
# installs mvmae_fast offline with its CUDA kernels, runs the GPU correctness tests (every backend,
# fp32/fp16/bf16, every Triton kernel against its torch reference), then the benchmark suite,
# writing <results-dir>/<GPU name>.json and its Markdown/PNG report.
set -euo pipefail
cd "$(dirname "$0")/.."
results="${1:-benchmarks/results}"
mkdir -p "$results"
# The Python that holds torch (on the lent GPU machines a bare `pip` belongs to another interpreter).
py="${PYTHON:-python3}"

MVMAE_FAST_CUDA=1 "$py" -m pip install --no-build-isolation --no-deps -e .
"$py" -c "import mvmae_fast._ext as e; assert e.cuda_compiled(), 'mvmae_fast._C was built without CUDA'"

# Native Triton for CUDA tensors (tests/conftest.py turns the interpreter on only if unset).
export TRITON_INTERPRET=0
"$py" -m pytest tests/test_cuda.py tests/test_cuda_kernels.py -q -rs

gpu=$("$py" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
if "$py" -c "import pytest_benchmark" 2>/dev/null; then
    "$py" -m pytest benchmarks/ --benchmark-only -q --benchmark-json "$results/$gpu.json"
    "$py" benchmarks/report.py "$results/$gpu.json"
else
    echo "pytest-benchmark is not installed here: skipping the benchmark suite"
fi
