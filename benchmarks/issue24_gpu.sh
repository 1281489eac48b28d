#!/usr/bin/env bash
# Issue 24 on one GPU, one command (≈ 6–8 minutes on an H200): the cuDNN-vs-flash GPU tests, the kernel rows of
# benchmarks/sp_attention.py (causal f+b at 32K and 128K, 32 q / 8 kv heads, d 128, bf16) and the hybrid `1b`
# (LLLA) training step at 128K on each backend. Every step runs even if an earlier one fails; outputs go to
# $OUT (default benchmarks/results/issue24), the log of each step next to them.
#
#     bash benchmarks/issue24_gpu.sh            # from the repository root; .whl/ (if carried) is installed first
set -u
cd "$(dirname "$0")/.."
DIR="${OUT:-benchmarks/results/issue24}"
. benchmarks/gpu_steps.sh  # wheels, PYTHONPATH, env.txt, `step`
step gpu_tests 150 python3 -m pytest -q -m gpu tests/parallel/test_attention_backends.py -rs
step kernels 150 python3 benchmarks/sp_attention.py --backends cudnn,flash --seq-lens 32768,131072 \
    --out "$DIR/sp_attention_backends.md"
step train_step 300 python3 benchmarks/train_step.py --only longtrain --seq-lens 128K --warmup 1 --steps 3 \
    --variant hybrid-cudnn:model.layout=LLLA,model.attention_backend=cudnn \
    --variant hybrid-flash:model.layout=LLLA,model.attention_backend=flash --out "$DIR/train_step.json"
save_autotune
cat "$DIR/status.txt"
pack_results
