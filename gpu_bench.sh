#!/usr/bin/env bash
# The GPU benchmark (issue #14): the DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights,
# bf16 autocast, full fine-tuning with the reference in memory, with cached reference log-probs, with
# LoRA, and TRL's DPOTrainer in its defaults when trl and datasets can be installed. Made to fit one
# call of the device tool (estimated 5 to 8 minutes on an H200; not yet measured), from the repository root:
#
#     bash gpu_bench.sh                       # writes $OUT/bench_gpu.json and $OUT/bench_gpu.log
#
# The device machine has torch, transformers, accelerate and peft but neither ../shared nor PyPI:
# put what it needs in ignored folders and carry them (the device tool's `carry`, 64 MiB in all):
#   .gl/arch/config.json        cp ../shared/models/deepseek-r1-distill-qwen-1.5b/config.json .gl/arch/
#   .gl/tokenizer/              cp -r ../shared/tokenizers/deepseek-r1-distill-qwen/. .gl/tokenizer/
#                               (11.4 MB; or, 2.1 MB: all but tokenizer.json, and gzip -c it > .gl/tokenizer.json.gz)
#   .gl/pairs-2000.jsonl.gz     cp ../shared/data/hh-rlhf-harmless-base/pairs-2000.jsonl.gz .gl/ (optional)
#   .whl/ (optional)            pip download --no-deps -d .whl trl==1.16.0 datasets==5.2.0 dill multiprocess
#                               (1.8 MB of wheels for the device's Python 3.12; without them the TRL rows are skipped)
# Read on the device 2026-11-30: NVIDIA H200, driver 580.159.04, Python 3.12 as `python3` (a symlink
# named python to it loses the image's venv: this script calls python3), torch 2.11.0,
# transformers 5.17.0, accelerate 1.15.0, peft 0.21.0, pandas 3.0.6, pyarrow 25.0.1 (datasets 5.2
# needs >= 24: no pyarrow wheel to carry). The hub is unreachable there, so everything runs offline.
# That day's call ran past its 560 s limit and brought nothing back (not even the first lines it
# printed): no GPU figure exists yet. Since 2026-12-07 (issue 31) the first line comes at once,
# every line reaches its log as it is printed (unbuffered Python, line-buffered filters), each stage
# has its own limit and is killed after it (timeout -k), ~470 s in all; the training stage keeps no
# checkpoint and reports to no tracker (the device has no tensorboard); the benchmark's batch
# follows the card's memory (8 x 1,024 tokens needs ~85 GB: 8 pairs on an H200, 4 on an H100).
# Then train.py end to end on the same architecture (random weights saved like a hub checkpoint):
# TRAIN_STEPS steps of learnable beta on DATA (default: the HH-RLHF pairs of ../shared, or
# .gl/pairs-2000.jsonl.gz, else the built-in demo pairs), then evaluate.py on the final checkpoint;
# writes $OUT/train_gpu.log, $OUT/eval_gpu.log and $OUT/eval_gpu.json. TRAIN_STEPS=0 skips it.
# Check it on CPU first with a tiny architecture (a few minutes):
#     ARCH=/tmp/tiny DEVICE=cpu MAX_LENGTH=64 BATCH=2 ROUNDS=1 TRAIN_STEPS=4 TRAIN_LENGTH=128 bash gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")"
ARCH=${ARCH:-$( [ -f .gl/arch/config.json ] && echo .gl/arch || echo ../shared/models/deepseek-r1-distill-qwen-1.5b )}
TOKENIZER=${TOKENIZER:-$( [ -d .gl/tokenizer ] && echo .gl/tokenizer || echo ../shared/tokenizers/deepseek-r1-distill-qwen )}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.}
BENCH_T=${BENCH_TIMEOUT:-200}   # seconds: the benchmark; then the model (T), training (TRAIN_T), evaluation (T)
T=${STAGE_TIMEOUT:-75}
TRAIN_T=${TRAIN_TIMEOUT:-120}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# a stage's lines reach its log as they are printed; progress bars' carriage-return updates are dropped
filter() { stdbuf -oL tr '\r' '\n' | grep --line-buffered -v "it/s\]$" | tee "$1"; }
echo "gpu_bench: $(date -u +%FT%TZ) device=$DEVICE arch=$ARCH, stage limits ${BENCH_T}/${T}/${TRAIN_T}/${T} s"
if [ -f .gl/tokenizer.json.gz ] && [ ! -f .gl/tokenizer/tokenizer.json ]; then gunzip -c .gl/tokenizer.json.gz > .gl/tokenizer/tokenizer.json; fi
if [ -d .whl ] && ! python3 -c "import trl, datasets" 2>/dev/null; then
    python3 -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl || echo "could not install the carried wheels: TRL rows skipped"
fi
MEM_MIB=0
if [ "$DEVICE" = cuda ]; then
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true
    MEM_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits 2>/dev/null | head -n 1 | tr -dc 0-9 || true)
fi
# 8 pairs x 1,024 tokens peak at ~80-85 GB: 8 on a card of >= 120 GB (an H200), else 4 (an H100's 80 GB)
BATCH=${BATCH:-$( [ "${MEM_MIB:-0}" -ge 120000 ] && echo 8 || echo 4 )}
echo "gpu_bench: benchmark, batch $BATCH x ${MAX_LENGTH:-1024} tokens"
timeout -k 10 "$BENCH_T" python3 bench.py --device "$DEVICE" --arch "$ARCH" --tokenizer "$TOKENIZER" --batch_size "$BATCH" \
    --max_length "${MAX_LENGTH:-1024}" --warmup_steps 2 --steps "${STEPS:-5}" --rounds "${ROUNDS:-2}" --json "$OUT/bench_gpu.json" 2>&1 \
    | filter "$OUT/bench_gpu.log" || echo "the benchmark failed or ran past ${BENCH_T} s"

[ "${TRAIN_STEPS:-40}" -gt 0 ] || exit 0
HH=../shared/data/hh-rlhf-harmless-base/pairs-2000.jsonl.gz
DATA=${DATA:-$( [ -f $HH ] && echo $HH || ( [ -f .gl/pairs-2000.jsonl.gz ] && echo .gl/pairs-2000.jsonl.gz ) || echo demo )}
WORK=$(mktemp -d)
echo "gpu_bench: train.py and evaluate.py on $DATA in $WORK"
timeout -k 10 "$T" python3 - "$ARCH" "$TOKENIZER" "$WORK/model" "$DEVICE" <<'EOF'
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
arch, tokenizer, out, device = sys.argv[1:]
torch.manual_seed(0)
with torch.device(device):
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(arch), dtype=torch.bfloat16)
model.save_pretrained(out)
AutoTokenizer.from_pretrained(tokenizer).save_pretrained(out)
EOF
L=${TRAIN_LENGTH:-512}
# no tracker (the device image has no tensorboard) and no step checkpoint (~21 GB with AdamW's
# state); the time limit kills the stage outright (-s KILL), so no signal handler writes one either
timeout -s KILL "$TRAIN_T" python3 train.py --model_name_or_path "$WORK/model" --dataset "$DATA" --output_dir "$WORK/run" \
    --beta_mode learnable --max_steps "${TRAIN_STEPS:-40}" --batch_size "$BATCH" --max_length "$L" \
    --max_prompt_length $((L * 3 / 4)) --max_eval_examples 64 --eval_every_steps 20 --log_every_steps 5 --policy_lr 1e-6 \
    --report_to none --save_every_steps 0 2>&1 | filter "$OUT/train_gpu.log" || { echo "train.py failed or ran past ${TRAIN_T} s"; exit 1; }
timeout -k 10 "$T" python3 evaluate.py --ckpt "$WORK/run/final" --max_examples 64 --out_name eval_gpu 2>&1 \
    | filter "$OUT/eval_gpu.log"
cp "$WORK/run/final/eval_gpu.json" "$OUT/" && cp "$WORK/run/metrics.jsonl" "$OUT/train_gpu_metrics.jsonl"
rm -rf "$WORK"
