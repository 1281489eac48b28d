#!/usr/bin/env bash
# Issue 20 on one GPU (one H200), a part per call of under 10 minutes. Every step runs even if an earlier one
# fails; outputs go to $OUT (default benchmarks/results/issue20), the log of each step next to them.
#
#   kernels: the delta-rule GPU tests (every case: the default split paths, the fused ones, K-blocked, fp16, fp32),
#            the kernels against fla 0.6.0's chunk_gated_delta_rule at the issue's four shapes (the default config,
#            window_tokens=65536 for peak memory, the fused paths with the tf32x3 solve; each kernel's GPU time),
#            then our gdn-1b step (pure D layout) at 128K and at 1M in 64K windows.
#   tune:    the solve_block GPU case; the kernels at 16×4K and 1×128K against fla with tile and solve configs
#            (this also compiles fla's kernels into Triton's cache for the next step); then the gdn-1b step at 128K,
#            selective (default) and full recomputation, against fla's GatedDeltaNetForCausalLM in the same run
#            (fla autotunes for minutes on its first step).
#   verify:  (3 minutes) the delta-rule GPU tests and the kernels against fla at 16×4K and 1×64K with each kernel's
#            time: a check of a changed default.
#   gdn:     (10 minutes) the issue's rows for gdn-1b (pure D layout) against fla's GatedDeltaNetForCausalLM at 128K
#            and 1M: first the kernels against fla at 1×1M (the default and window_tokens=65536: time and peak
#            memory; this also autotunes fla's delta-rule kernels, which its model shares), then our step at 128K
#            (selective and full recomputation) and at 1M in 64K windows, then fla's step at 128K and 1M.
#   mamba2:  (10 minutes) mamba2-1b at 128K (auto: full recomputation for M stacks) and at 1M in 64K windows,
#            selective recomputation at 64K with its memory snapshot (`--memory`: where the bytes beyond the
#            estimate are), then fla's Mamba2ForCausalLM at 128K and 1M on mamba_ssm's Triton kernels (the wheel
#            benchmarks/wheels.py builds; without it fla runs its naive PyTorch path and says so).
#   models:  (9.5 minutes, with .autotune.tar.gz carried) the D mixer's GPU test (q, k's L2 norm on the Triton
#            norm), then both presets at 128K beside fla's models in one call: gdn-1b selective and full, mamba2-1b
#            full, 64K windows and selective (whether 128K fits now), then fla-gdn and fla-mamba2 at 128K; and both
#            at 1M in 64K windows; each of our rows with one profiled step (kernel table in $DIR/profile).
#   windows: (4.5 minutes) gdn-1b and mamba2-1b at 128K under full recomputation and in 64K and 32K windows, each
#            row with one profiled step: where the time goes and what windows cost (no fla anchor: explore only).
#   fused:   (9.5 minutes) the GPU tests of kernels/ssd_inputs and kernels/gated_norm, then mamba2-1b (its mixer's
#            elementwise stages on them) at 128K (full recomputation, 64K windows, full with activation offload;
#            profiled) and at 1M in 64K windows, gdn-1b at 128K (full, full with activation offload) and at 1M in
#            64K windows, and fla-gdn and fla-mamba2 at 128K in the same call.
#   anchor:  (9 minutes) the train_step goal's rows with their anchors in one call: fla-mamba2 first (its warm-up
#            takes ~47 s on the carried tunings), then mamba2-1b at 128K with activation offload, with offload and
#            the MLP in 16K tiles (train.mlp_tile: a recomputed block's MLP internals at tile size, no extra forward)
#            and in 64K windows; fla-gdn, then gdn-1b at 128K: full + offload, full + offload + 16K MLP tiles, the
#            same with model.delta_window=32768, and full + 16K MLP tiles.
#   wy16:    (9 minutes) the delta-rule GPU tests of DeltaConfig.wy_16bit and the 16K case; the kernels against
#            fla at 16×4K and 1×128K, default vs wy_16bit (each kernel's time); fla-gdn, then gdn-1b at 128K under
#            full recomputation + offload with the MLP in 16K tiles (tiled_residual: no down projection recomputed),
#            also with model.delta_window=65536 / 32768; the 1b preset at 128K, full recomputation, with and without
#            16K MLP tiles (what tiling saves for L blocks).
#   m1:      (8 minutes) the 1M rows with their anchors in one call: fla-gdn and fla-mamba2 at 1M (on one H200 the
#            first ran out of memory and the second faulted in the fifteenth session), then gdn-1b (pure D) at 1M in
#            64K windows, also with the MLP in 16K tiles, and mamba2-1b at 1M in 64K windows; first (when given)
#            the kernels at 16×4K and 1×128K with the configs in $KERNEL_CONFIGS, against fla.
#     bash benchmarks/issue20_gpu.sh kernels|tune|verify|gdn|mamba2|models|windows|fused|anchor|wy16|m1   # from the repository root; carry .whl/ (the wheels
#     # of benchmarks/wheels.py) and .autotune.tar.gz (a previous call's $OUT/autotune.tar.gz: fla skips its autotuning)
set -u
cd "$(dirname "$0")/.."
PART="${1:-kernels}"
DIR="${OUT:-benchmarks/results/issue20}"
. benchmarks/gpu_steps.sh  # wheels, PYTHONPATH, env.txt, `step`
GDN=(python3 benchmarks/train_step.py --preset gdn-1b --set model.layout=D --warmup 1 --steps 2)
case "$PART" in
kernels)
    step gpu_tests 170 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -rs
    step kernels 260 python3 benchmarks/delta_rule.py --kernels --out "$DIR/delta_rule.md" \
        --configs "default:;w64k:window_tokens=65536;fused:out_split=0,grad_split=0,bwd_split=0,solve_passes=3"
    step train_step 150 "${GDN[@]}" --only longtrain --seq-lens 128K,1M --variant "default@128K:" \
        --variant "w64k@1M:train.window=65536" --out "$DIR/train_step.json"
    ;;
tune)
    step gpu_tests 90 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -k "16K or solve16" -rs
    step kernels 170 python3 benchmarks/delta_rule.py --shapes 16x4096,1x131072 --out "$DIR/delta_rule_tune.md" \
        --configs "default:;solve16:solve_block=16;solve32:solve_block=32;prep4:prep_warps=4;solve16-prep4:solve_block=16,prep_warps=4;gp512:grad_programs=512;gp2048:grad_programs=2048"
    step train_step 320 "${GDN[@]}" --seq-lens 128K --variant default: --variant full:parallel.remat_policy=full \
        --warmup-timeout 240 --out "$DIR/train_step.json"
    ;;
verify)
    step gpu_tests 80 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -rs
    step kernels 100 python3 benchmarks/delta_rule.py --shapes 16x4096,1x65536 --kernels --out "$DIR/delta_rule.md"
    ;;
gdn)
    step kernels_1m 200 python3 benchmarks/delta_rule.py --shapes 1x1048576 --out "$DIR/delta_rule_1m.md" \
        --configs "default:;w64k:window_tokens=65536"
    step train_step 190 "${GDN[@]}" --only longtrain --seq-lens 128K,1M --variant default@128K: \
        --variant full@128K:parallel.remat_policy=full --variant w64k@1M:train.window=65536 --out "$DIR/train_step.json"
    step fla_step 190 "${GDN[@]}" --only fla --seq-lens 128K,1M --warmup-timeout 170 --out "$DIR/train_step.json"
    ;;
mamba2)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    step train_step 180 "${M2[@]}" --only longtrain --seq-lens 128K,1M --variant default@128K: \
        --variant w64k@1M:train.window=65536 --out "$DIR/train_step.json"
    step memory 80 "${M2[@]}" --only longtrain --seq-lens 64K --variant selective:parallel.remat_policy=selective \
        --memory "$DIR/memory" --out "$DIR/train_step.json"
    step fla_step 300 "${M2[@]}" --only fla --seq-lens 128K,1M --warmup-timeout 280 --out "$DIR/train_step.json"
    ;;
models)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    step gpu_tests 40 python3 -m pytest -q -m gpu tests/models/test_gated_deltanet.py -rs
    step gdn_step 150 "${GDN[@]}" --only longtrain --seq-lens 128K,1M --variant default@128K: \
        --variant full@128K:parallel.remat_policy=full --variant w64k@1M:train.window=65536 \
        --profile "$DIR/profile" --out "$DIR/train_step.json"
    step mamba2_step 185 "${M2[@]}" --only longtrain --seq-lens 128K,1M --variant default@128K: \
        --variant w64k@128K+1M:train.window=65536 --variant selective@128K:parallel.remat_policy=selective \
        --profile "$DIR/profile" --out "$DIR/train_step.json"
    step fla_gdn 100 "${GDN[@]}" --only fla --seq-lens 128K --warmup-timeout 85 --out "$DIR/train_step.json"
    step fla_mamba2 95 "${M2[@]}" --only fla --seq-lens 128K --warmup-timeout 80 --out "$DIR/train_step.json"
    ;;
windows)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    step gdn_step 130 "${GDN[@]}" --only longtrain --seq-lens 128K --variant full:parallel.remat_policy=full \
        --variant w64k:train.window=65536 --variant w32k:train.window=32768 --profile "$DIR/profile" \
        --out "$DIR/train_step.json"
    step mamba2_step 130 "${M2[@]}" --only longtrain --seq-lens 128K --variant default: \
        --variant w64k:train.window=65536 --variant w32k:train.window=32768 --profile "$DIR/profile" \
        --out "$DIR/train_step.json"
    ;;
fused)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    step gpu_tests 50 python3 -m pytest -q -m gpu tests/kernels/test_ssd_inputs.py tests/kernels/test_gated_norm.py -rs
    step mamba2_step 125 "${M2[@]}" --only longtrain --seq-lens 128K --variant default: \
        --variant w64k:train.window=65536 --variant offload:parallel.offload=true --profile "$DIR/profile_mamba2" \
        --out "$DIR/train_step.json"
    step mamba2_1m 70 "${M2[@]}" --only longtrain --seq-lens 1M --variant w64k:train.window=65536 \
        --out "$DIR/train_step.json"
    step gdn_step 120 "${GDN[@]}" --only longtrain --seq-lens 128K,1M --variant full@128K:parallel.remat_policy=full \
        --variant offload@128K:parallel.remat_policy=full,parallel.offload=true \
        --variant w64k@1M:train.window=65536 --out "$DIR/train_step.json"
    step fla_gdn 80 "${GDN[@]}" --only fla --seq-lens 128K --warmup-timeout 65 --out "$DIR/train_step.json"
    step fla_mamba2 90 "${M2[@]}" --only fla --seq-lens 128K --warmup-timeout 75 --out "$DIR/train_step.json"
    ;;
anchor)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    step fla_mamba2 150 "${M2[@]}" --only fla --seq-lens 128K --warmup-timeout 120 --out "$DIR/train_step.json"
    step mamba2_step 150 "${M2[@]}" --only longtrain --seq-lens 128K --variant offload:parallel.offload=true \
        --variant offload-t16k:parallel.offload=true,train.mlp_tile=16384 --variant w64k:train.window=65536 \
        --out "$DIR/train_step.json"
    step fla_gdn 90 "${GDN[@]}" --only fla --seq-lens 128K --warmup-timeout 70 --out "$DIR/train_step.json"
    step gdn_step 150 "${GDN[@]}" --only longtrain --seq-lens 128K \
        --variant offload:parallel.remat_policy=full,parallel.offload=true \
        --variant offload-t16k:parallel.remat_policy=full,parallel.offload=true,train.mlp_tile=16384 \
        --variant offload-t16k-dw32k:parallel.remat_policy=full,parallel.offload=true,train.mlp_tile=16384,model.delta_window=32768 \
        --variant full-t16k:parallel.remat_policy=full,train.mlp_tile=16384 --out "$DIR/train_step.json"
    ;;
wy16)
    step gpu_tests 60 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -k "wy32 or 16K" -rs
    step kernels 120 python3 benchmarks/delta_rule.py --shapes 16x4096,1x131072 --kernels \
        --configs "default:;wy16:wy_16bit=1" --out "$DIR/delta_rule_wy16.md"
    step fla_gdn 80 "${GDN[@]}" --only fla --seq-lens 128K --warmup-timeout 60 --out "$DIR/train_step.json"
    OFF=parallel.remat_policy=full,parallel.offload=true,train.mlp_tile=16384
    step gdn_step 140 "${GDN[@]}" --only longtrain --seq-lens 128K --variant "offload-t16k:$OFF" \
        --variant "offload-t16k-dw64k:$OFF,model.delta_window=65536" \
        --variant "offload-t16k-dw32k:$OFF,model.delta_window=32768" --out "$DIR/train_step.json"
    step l_step 110 python3 benchmarks/train_step.py --preset 1b --warmup 1 --steps 2 --only longtrain --seq-lens 128K \
        --variant full:parallel.remat_policy=full --variant full-t16k:parallel.remat_policy=full,train.mlp_tile=16384 \
        --out "$DIR/train_step.json"
    ;;
m1)
    M2=(python3 benchmarks/train_step.py --preset mamba2-1b --warmup 1 --steps 2)
    if [ -n "${KERNEL_CONFIGS:-}" ]; then
        step gpu_tests 45 python3 -m pytest -q -m gpu tests/kernels/test_delta_rule.py -k "${GPU_TESTS:-16K}" -rs
        step kernels 90 python3 benchmarks/delta_rule.py --shapes 16x4096,1x131072 --kernels \
            --configs "$KERNEL_CONFIGS" --out "$DIR/delta_rule.md"
    fi
    step fla_gdn_1m 55 "${GDN[@]}" --only fla --seq-lens 1M --warmup-timeout 45 --out "$DIR/train_step.json"
    step fla_mamba2_1m 65 "${M2[@]}" --only fla --seq-lens 1M --warmup-timeout 55 --out "$DIR/train_step.json"
    step gdn_1m 180 "${GDN[@]}" --only longtrain --seq-lens 1M --variant w64k:train.window=65536 \
        --variant w64k-t16k:train.window=65536,train.mlp_tile=16384 --out "$DIR/train_step.json"
    step mamba2_1m 95 "${M2[@]}" --only longtrain --seq-lens 1M --variant w64k:train.window=65536 \
        --out "$DIR/train_step.json"
    ;;
*)
    echo "usage: bash benchmarks/issue20_gpu.sh kernels|tune|verify|gdn|mamba2|models|windows|fused|anchor|wy16|m1" >&2
    exit 2
    ;;
esac
save_autotune
cat "$DIR/status.txt"
pack_results
