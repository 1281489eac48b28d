#!/usr/bin/env bash
# Issue 19 on one GPU (one H200), one call of under 10 minutes: the one-GPU sweep of the `1b` preset with today's
# code (configs/sweeps/h200-1gpu.toml: 32K, 128K, 512K, 1M × whole sequence / 64K windows, full recomputation; the
# whole-sequence points the memory check refuses are rows too), its predictions recorded at launch by today's plan,
# each point's steps timed beside the host-speed anchor (run.speed_anchor, which the sweep sets). Outputs go to
# $OUT (default benchmarks/results/issue19): the sweep folder packed into results.tar.gz; `longtrain report` runs
# where it lands (matplotlib).
#
# Part `remat` re-runs the sweep that checks the plan with and without recomputation, the pairs in one call:
# configs/sweeps/h200-remat.toml (64K, 256K × whole / 32K windows × remat always / never; about 4 minutes).
#
#   bash benchmarks/issue19_gpu.sh [1gpu|remat]   # carry [".whl", ".autotune.tar.gz"]; default 1gpu
set -u
PART="${1:-1gpu}"
if [ "$PART" != 1gpu ] && [ "$PART" != remat ]; then
    echo "usage: bash benchmarks/issue19_gpu.sh [1gpu|remat]" >&2
    exit 2
fi
DIR="${OUT:-benchmarks/results/issue19}"
source benchmarks/gpu_steps.sh
if [ "$PART" = 1gpu ]; then
    step sweep 540 python3 -m launch.cli sweep configs/sweeps/h200-1gpu.toml --out "$DIR/h200-1gpu" --timeout 200
else
    step sweep_remat 300 python3 -m launch.cli sweep configs/sweeps/h200-remat.toml --out "$DIR/h200-remat" --timeout 100
fi
save_autotune
pack_results
