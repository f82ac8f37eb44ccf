#!/usr/bin/env bash
# GPU check of spin_kernels/ in one 15-minute device window (H100/H200, no internet), issue 14's numbers first:
# bf16 forward + backward at Llama 3's head (D=4096, V=128256) and SmolLM2's (D=576, V=49152), 4096 tokens,
# time and peak memory of the naive path, the fused kernel, its forward alone and the old kernel (atomics
# backward), in the same run (SmolLM2 also: the PyTorch twin); then the kernel
# tests compiled for the GPU, fp32, and a short sweep of the kernels' tiles at the Llama 3 shape. Each
# step has its own timeout; all of them together stay under ~10 minutes.
# Usage: bash bench/gpu_kernels.sh              on the GPU
#        bash bench/gpu_kernels.sh --cpu-smoke  the same steps on CPU, Triton's interpreter, tiny shapes:
#                                               run it before a GPU session so the script works first time
set -u
cd "$(dirname "$0")/.."
step() { local t=$1; shift; echo "== $*"; timeout "$t" "$@" || echo "== exit $? (124 = timed out): $*"; }
PATHS="--paths naive,fused,fwd,old"
if [ "${1:-}" = "--cpu-smoke" ]; then
  export TRITON_INTERPRET=1
  DEV="--device cpu --repeats 1"
  LLAMA="--tokens 96 --dim 64 --vocab 1500"
  SMOL="--tokens 64 --dim 32 --vocab 1000"
  TESTS=(-k "triton and odd_shapes")
  S=0.5  # timeouts scale
else
  unset TRITON_INTERPRET
  DEV="--device cuda"
  LLAMA="--dim 4096 --vocab 128256"
  SMOL="--dim 576 --vocab 49152"
  TESTS=()
  S=1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
t() { python -c "print(max(20, int($1 * $S)))"; }  # a step's timeout, seconds
python -c "import torch, triton, spin_kernels; print('torch', torch.__version__, 'triton', triton.__version__,
  'cuda', torch.cuda.is_available(), 'Triton path', spin_kernels.TRITON_CUDA or spin_kernels.TRITON_INTERPRET)"
step "$(t 120)" python bench/bench_logprobs.py $DEV --dtype bf16 $LLAMA $PATHS
step "$(t 90)" python bench/bench_logprobs.py $DEV --dtype bf16 $SMOL $PATHS,twin
step "$(t 200)" python -m pytest -q -p no:cacheprovider -rs --durations=5 tests/test_kernels.py ${TESTS[@]+"${TESTS[@]}"}
step "$(t 60)" python bench/bench_logprobs.py $DEV --dtype fp32 $SMOL --paths naive,fused,old
# the kernels' tiles at the Llama 3 shape (times only; defaults: 128 x 128 x 64, 8 warps, 3 stages,
# backward chunks of ~16k columns)
for kw in '{"block_v": 256}' '{"num_warps": 4, "num_stages": 4}' '{"chunk": 32768}'; do
  step "$(t 40)" python bench/bench_logprobs.py $DEV --dtype bf16 $LLAMA --paths fused,fwd --memory 0 \
    --repeats 5 --kw "$kw"
done
