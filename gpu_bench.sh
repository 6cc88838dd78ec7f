#!/usr/bin/env bash
# The GPU benchmark (issue #14): the DeepSeek-R1-Distill-Qwen-1.5B architecture with random weights,
# bf16 autocast, full fine-tuning with the reference in memory, with cached reference log-probs, with
# LoRA, and TRL's DPOTrainer in its defaults when trl and datasets can be installed. Made to fit one
# call of the device tool (about 5 minutes on an H200), from the repository root:
#
#     bash gpu_bench.sh                       # writes $OUT/bench_gpu.json and $OUT/bench_gpu.log
#
# The device machine has torch, transformers, accelerate and peft but neither ../shared nor PyPI:
# put what it needs in ignored folders and carry them (the device tool's `carry`, 64 MiB in all):
#   .gl/arch/config.json        cp ../shared/models/deepseek-r1-distill-qwen-1.5b/config.json .gl/arch/
#   .gl/tokenizer/              cp -r ../shared/tokenizers/deepseek-r1-distill-qwen/. .gl/tokenizer/
#   .whl/ (optional)            pip download --no-deps -d .whl trl==1.16.0 datasets==5.2.0 pyarrow==26.0.1 dill \
#                                   multiprocess xxhash   (wheels for the device's Python)
# Without trl and datasets the TRL rows are skipped. Measured 2026-11-30: those wheels are 57.6 MB
# (pyarrow alone 55.0 MB) and datasets also needs pandas (~12 MB), so with the tokenizer (11.4 MB) they
# exceed the 64 MiB carry limit unless the device already has pandas: the TRL GPU rows may have to
# wait for a device with TRL installed.
# Check it on CPU first with a tiny architecture (seconds):
#     ARCH=/tmp/tiny DEVICE=cpu MAX_LENGTH=64 BATCH=2 bash gpu_bench.sh
set -euo pipefail
cd "$(dirname "$0")"
ARCH=${ARCH:-$( [ -f .gl/arch/config.json ] && echo .gl/arch || echo ../shared/models/deepseek-r1-distill-qwen-1.5b )}
TOKENIZER=${TOKENIZER:-$( [ -d .gl/tokenizer ] && echo .gl/tokenizer || echo ../shared/tokenizers/deepseek-r1-distill-qwen )}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-.}
if [ -d .whl ] && ! python -c "import trl, datasets" 2>/dev/null; then
    python -m pip install -q --no-index --find-links .whl --no-deps .whl/*.whl || echo "could not install the carried wheels: TRL rows skipped"
fi
if [ "$DEVICE" = cuda ]; then nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv || true; fi
python bench.py --device "$DEVICE" --arch "$ARCH" --tokenizer "$TOKENIZER" --batch_size "${BATCH:-8}" \
    --max_length "${MAX_LENGTH:-1024}" --warmup_steps 2 --steps "${STEPS:-5}" --json "$OUT/bench_gpu.json" 2>&1 \
    | grep -v "it/s\]" | tee "$OUT/bench_gpu.log"
