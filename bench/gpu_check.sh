#!/usr/bin/env bash
# One GPU session's checks for the GPU issues (21: training, 22: generation), one script, <= 8 minutes on the
# lent H200 (no internet, no package registry: torch, Triton, transformers there; TRL comes from .gpu/):
#   env        versions, the GPU; TRL and what it needs installed from .gpu/wheels (bench/gpu_prepare.py)
#   kernels    tests/test_kernels.py -k "odd_shapes", compiled for the GPU
#   packing    tests/test_packing.py (FlexAttention's block mask against the dense rule, on the GPU)
#   checkpoint a random Llama-3.2-1B-shaped checkpoint with SmolLM2's tokenizer (bench/workload.py)
#   train      bench_train.py --shape 1b: TRL's DPOTrainer, spin, spin with gradient checkpointing (score +
#              1 epoch, 256 pairs, batch 32): time, answer tokens/s, peak memory, ratios against TRL; then
#              spin's steps under torch.profiler; TRL without gradient checkpointing if time is left
#   fit        bench_train.py --shape 7b --fit: does spin's train phase fit a 7B (fp32 master weights,
#              AdamW), at which micro-batch, with and without gradient checkpointing
#   generate   bench_generate.py --shape 1b: ours eager and compiled against transformers generate(), its
#              static cache, generate_batch(), 256 prompts x 256 tokens; pools of 256 and 512 rows on 1,024
#              prompts; identical answers
#   e2e        python spin.py on the 1b checkpoint: 1 iteration, 256 prompts, 32 held out; phase times
# Each step runs under `timeout`, capped so that all of them end within $BUDGET seconds (default 480); a
# step with no time left is skipped, later steps first. Logs and JSON go to $OUT (default /tmp/gpu_out),
# checkpoints and runs to /tmp/spin_gpu (never back). The summary at the end: each step's status and time,
# then every table the steps printed (the full logs, the profile's included, are in $OUT).
# Usage: python bench/gpu_prepare.py         here, once: .gpu/ (~35 MiB; the device run carries ".gpu")
#        bash bench/gpu_check.sh              on the GPU
#        bash bench/gpu_check.sh --cpu-smoke  the same steps on this CPU at tiny shapes (a few minutes): run
#                                             it before spending device time
#        bash bench/gpu_check.sh --only train,generate   some steps only (env and checkpoint always)
set -u
cd "$(dirname "$0")/.."
SMOKE=0 ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --only) ONLY=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
OUT=${OUT:-/tmp/gpu_out}
WORK=/tmp/spin_gpu
mkdir -p "$OUT" "$WORK"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
  HF_HUB_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1
if [ "$SMOKE" = 1 ]; then  # tiny shapes, few prompts, one thread; Triton's interpreter for the kernel tests
  DEV=cpu SHAPE=tiny BIG=tiny BUDGET=${BUDGET:-900}
  export OMP_NUM_THREADS=1
  KERNELS=(env TRITON_INTERPRET=1 python -m pytest -q -p no:cacheprovider tests/test_kernels.py
           -k "triton and odd_shapes")
  TRAIN=(--pairs 8 --batch_size 4) FIT=(--batch_size 4)
  GEN=(--prompts 8 --new 16 --pool_prompts 16 --pools 4,8 --threads 1)
  E2E=(--num_prompts=16 --num_eval=4 --batch_size=8 --max_new_tokens=16)
  cap() { echo "$2"; }  # cap GPU_SECONDS CPU_SECONDS
else
  DEV=cuda SHAPE=1b BIG=7b BUDGET=${BUDGET:-480}
  unset TRITON_INTERPRET
  KERNELS=(python -m pytest -q -p no:cacheprovider tests/test_kernels.py -k "odd_shapes")
  TRAIN=() FIT=() GEN=()
  E2E=(--num_prompts=256 --num_eval=32 --batch_size=32)
  cap() { echo "$1"; }
fi
CKPT=$WORK/ckpt_$SHAPE
DEADLINE=$((SECONDS + BUDGET))
STATUS=() RAN=()

limit() {  # limit GPU_SECONDS CPU_SECONDS: this step's timeout, within what is left of the budget
  local c left
  c=$(cap "$1" "$2")
  left=$((DEADLINE - SECONDS))
  echo $((c < left ? c : left))
}

step() {  # step NAME SECONDS CMD...: CMD under timeout; its output on the screen (no progress bars) and in
  local name=$1 t=$2 t0=$SECONDS rc  # $OUT/NAME.log
  shift 2
  if [ -n "$ONLY" ] && [[ ",$ONLY,env,checkpoint," != *",$name,"* ]]; then return; fi
  if [ "$t" -lt 15 ]; then
    echo "== $name: skipped, the $BUDGET s budget is spent"
    STATUS+=("$(printf '%-10s %s' "$name" "skipped (budget spent)")")
    return
  fi
  echo "== $name (timeout $t s): $*"
  RAN+=("$name")
  timeout -k 10 "$t" "$@" 2>&1 | tee "$OUT/$name.log" | grep --line-buffered -v '%|'
  rc=${PIPESTATUS[0]}
  case $rc in 0) rc=ok ;; 124|137) rc="timed out" ;; *) rc="exit $rc" ;; esac
  STATUS+=("$(printf '%-10s %-10s %4d s' "$name" "$rc" $((SECONDS - t0)))")
}

# ----- the environment; TRL from .gpu/wheels (on the CPU smoke only what would be installed) -----
if [ ! -f .gpu/chat.jsonl ] || [ ! -d .gpu/tokenizer ] || [ ! -d .gpu/wheels ]; then
  echo "no .gpu/ here: run python bench/gpu_prepare.py first (and carry .gpu to the device)"; exit 2
fi
if [ "$SMOKE" = 1 ]; then
  step env "$(limit 30 60)" python bench/gpu_prepare.py --install "$WORK/site" --dry_run
else
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  step env "$(limit 30 60)" python bench/gpu_prepare.py --install "$WORK/site"
  export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
python -c "import torch, transformers, spin_kernels as k; print('torch', torch.__version__, 'cuda',
  torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '',
  'transformers', transformers.__version__, 'Triton path', bool(k.TRITON_CUDA or k.TRITON_INTERPRET))"
python -c "import trl, datasets, accelerate; print('trl', trl.__version__, 'datasets', datasets.__version__,
  'accelerate', accelerate.__version__)" 2>&1 | tail -1

# ----- correctness on the device first: the kernels and the packed attention -----
step kernels "$(limit 60 120)" "${KERNELS[@]}"
step packing "$(limit 40 120)" python -m pytest -q -p no:cacheprovider tests/test_packing.py

# ----- issue 21: training -----
step checkpoint "$(limit 30 60)" python bench/workload.py make --shape "$SHAPE" --out "$CKPT"
t=$(limit 160 400)
step train "$t" python bench/bench_train.py --device "$DEV" --shape "$SHAPE" --ckpt "$CKPT" \
  --ways trl,packed --spin_flags= --spin_flags=--grad_checkpointing=true \
  --trl_flags= --trl_flags=gradient_checkpointing=false --profile \
  --timeout "$(cap 80 200)" --budget $((t - 5)) --json "$OUT/train.json" ${TRAIN[@]+"${TRAIN[@]}"}
t=$(limit 90 120)
step fit "$t" python bench/bench_train.py --device "$DEV" --shape "$BIG" --fit \
  --timeout "$(cap 75 60)" --budget $((t - 5)) --json "$OUT/fit.json" ${FIT[@]+"${FIT[@]}"}

# ----- issue 22: generation -----
t=$(limit 130 200)
step generate "$t" python bench/bench_generate.py --device "$DEV" --shape "$SHAPE" --ckpt "$CKPT" \
  --timeout "$(cap 70 120)" --budget $((t - 5)) --json "$OUT/generate.json" ${GEN[@]+"${GEN[@]}"}

# ----- spin.py end to end on the same checkpoint (a random model never stops: keep the cut samples) -----
rm -rf "$WORK/e2e" "$OUT/e2e_phases.txt"
step e2e "$(limit 90 150)" python spin.py --model "$CKPT" --data .gpu/chat.jsonl --out "$WORK/e2e" \
  --iterations=1 --epochs=1 --cut_samples=keep "${E2E[@]}"
if [ -f "$WORK/e2e/metrics.jsonl" ]; then
  mkdir -p "$OUT/e2e" && cp "$WORK/e2e/"*.jsonl "$OUT/e2e/"
  python bench/phases.py "$WORK/e2e" "$OUT/e2e.log" > "$OUT/e2e_phases.txt"
fi

# ----- summary: statuses, then every table (a table's title is the line above it) -----
echo
echo "== summary: $SECONDS s in all (budget $BUDGET s); logs and JSON in $OUT"
printf '%s\n' "${STATUS[@]}"
for name in ${RAN[@]+"${RAN[@]}"}; do
  f=$OUT/$name.log
  [ "$name" = e2e ] && f=$OUT/e2e_phases.txt
  [ -f "$f" ] && [ "$name" != env ] && [ "$name" != checkpoint ] || continue
  echo "-- $name"
  case $name in
    kernels|packing) tail -n 1 "$f" ;;
    e2e) cat "$f" ;;
    *) tr '\r' '\n' < "$f" | awk '/^\|/ { if (prev !~ /^\|/ && prev != "") print prev; print }
                                  { prev = $0 } /^(answer tokens|  eager vs|  pool [0-9])/' ;;
  esac
done
