#!/usr/bin/env bash
# Issue 20 on one GPU, one command (≈ 8–10 minutes on an H200): the delta-rule GPU tests (the split paths and the
# K-blocked gradient kernel), the kernels against fla 0.6.0's chunk_gated_delta_rule with the split configs and
# each kernel's GPU time, then the gdn-1b training step (pure D layout) at 128K, fused vs split kernels, with fla's
# GatedDeltaNetForCausalLM in the same run. Every step runs even if an earlier one fails; outputs go to $OUT
# (default benchmarks/results/issue20), the log of each step next to them.
#
#     bash benchmarks/issue20_gpu.sh            # from the repository root; .whl/ (fla wheels, if carried) first
set -u
cd "$(dirname "$0")/.."
DIR="${OUT:-benchmarks/results/issue20}"
. benchmarks/gpu_steps.sh  # wheels, PYTHONPATH, env.txt, `step`
step gpu_tests 180 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -k "split or kb64 or 16K" -rs
step kernels 240 python3 benchmarks/delta_rule.py --shapes 16x4096,1x65536 --kernels --out "$DIR/delta_rule.md" \
    --configs "default:;split:out_split=1,grad_split=1,bwd_split=1;gradsplit:grad_split=1;split-sweep4:out_split=1,grad_split=1,bwd_split=1,sweep_warps=4,sweep_bv=32;split-solve1:out_split=1,grad_split=1,bwd_split=1,solve_passes=1"
step train_step 300 python3 benchmarks/train_step.py --preset gdn-1b --set model.layout=D --seq-lens 128K \
    --warmup 1 --steps 2 --variant fused: --variant split:model.delta_split=true --out "$DIR/train_step.json"
cat "$DIR/status.txt"
