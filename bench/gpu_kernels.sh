#!/usr/bin/env bash
# GPU check of kernels/ (H100, no internet): the kernel tests compiled for the GPU (no interpreter), then
# naive vs fused vs the PyTorch twin, time and peak memory, in bf16 at SmolLM2's and Llama-3's head sizes
# and in fp32. Each step has its own timeout so the whole script stays under 4 minutes.
# Usage: bash bench/gpu_kernels.sh
set -u
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
pip list 2>/dev/null | grep -i -E 'torch|triton'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, kernels; print('cuda', torch.cuda.is_available(), 'triton path', kernels.TRITON_CUDA)"
step() { local t=$1; shift; echo "== $*"; timeout "$t" "$@" || echo "== exit $? (124 = timed out): $*"; }
step 80 python -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_kernels.py
step 30 python bench/bench_logprobs.py --device cuda --dtype bf16
step 45 python bench/bench_logprobs.py --device cuda --dtype bf16 --dim 4096 --vocab 128256
step 30 python bench/bench_logprobs.py --device cuda --dtype fp32
