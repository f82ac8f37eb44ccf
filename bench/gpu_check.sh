#!/usr/bin/env bash
# One GPU session's checks, in one go (the lent H100 has no internet; torch, triton, transformers there):
# the kernels (tests compiled for the GPU, bench) and spin.py end to end on
# the GPU (NCCL group of one, bf16 compute, fp32 master weights) on a tiny checkpoint made beforehand
# with tests/conftest.py's build_checkpoint into .gpu/ckpt (and .gpu/data.jsonl).
set -u
cd "$(dirname "$0")/.."
bash bench/gpu_kernels.sh
step() { local t=$1; shift; echo "== $*"; timeout "$t" "$@" || echo "== exit $? (124 = timed out): $*"; }
out=${OUT:-/tmp}/spin_gpu
step 100 python spin.py --model .gpu/ckpt --data .gpu/data.jsonl --out "$out" --iterations=2 --epochs=1 \
  --batch_size=8 --max_new_tokens=16 --lr=1e-4 --num_eval=8 --gen_batch_size=16
tail -n 3 "$out/metrics.jsonl" "$out/eval.jsonl" 2>/dev/null
