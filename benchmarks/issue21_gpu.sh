#!/usr/bin/env bash
# Issue 21 on one 8-GPU H200 node (`nvidia-h200-x8`), a part per device call of under 10 minutes (the `step` limits of
# each part add up to ≤ 530 s). Every step runs even if an earlier one fails; outputs go to $OUT (default
# benchmarks/results/issue21), the log of each step next to them, everything but env.txt, status.txt and
# autotune.tar.gz packed into results.tar.gz (benchmarks/gpu_steps.sh). Run directories: $DIR/runs (no checkpoints),
# the Ray part's (checkpoints of the 1b state) under $RAY_RUNS (default /tmp/issue21-ray), of which only
# metrics.parquet and the logs are kept.
#
#   single:   (≈ 4 min, one GPU: the kind lent now) LASP-2 with the gate at 512K tokens on one GPU, and the weak
#             part's two one-GPU rows (1b L at 1M in 64K windows; LLLA at 128K): the 1-GPU sides of runs 1 and 2.
#   lasp2:    (≈ 6 min) LASP-2 weak scaling of one linear-attention layer (H 16, K = V 128, bf16, RetNet decay and
#             a data-dependent gate), 512K tokens per GPU on 2, 4, 8 GPUs against the same 512K tokens on one GPU
#             (benchmarks/sp_attention.py's bench_lasp2 measures t1 on every rank beside tN; efficiency t1/tN;
#             goal ≥ 0.97 at 2, ≥ 0.95 at 8), each with --profile-lasp: the CUDA kernel table of 3 steps, whose
#             ncclDevKernel_AllGather / ReduceScatter rows are LASP-2's exchange time ($DIR/lasp2_summary.txt
#             collects them). The gate: sp_attention.py's LASP-2 has none (decay only), so a small wrapper
#             (written to a temporary file below) hands every lasp2_linear_attention call of the script
#             gate = logsigmoid(q[..., 0]) / 16 (the L layer's gate form); then the ungated script at 8 GPUs.
#             No fla context-parallel anchor: fla 0.6.0 (the carried wheel) has context parallelism (fla.ops.cp)
#             only for its delta-rule family (gated_delta_rule, kda, rwkv7, ...), not for (gated) linear attention.
#   weak:     (≈ 8 min) end-to-end weak scaling of the 1b preset (gate, parallel.shard=none: the same per-GPU state
#             as one GPU), tokens/s/GPU and MFU from each run's metrics.parquet ($DIR/weak.md):
#             pure linear (model.layout=L) at 1M tokens per GPU: 1 GPU 1M tokens vs 8 GPUs one 8M-token sequence
#             (sp 8), both in 64K-token windows per GPU (train.window=65536 / 524288: under sp the window is
#             global, runtime/trainer.py divides it by sp) with parallel.remat=never (the memory estimate counts
#             a window's shard per rank since the eighteenth session; `longtrain plan`: 88.8 GiB per GPU for the
#             8-GPU run). Hybrid LLLA at 1M tokens per GPU (8M per sequence) cannot run: the
#             plan predicts 175 GiB per GPU and 1,221 s per step (softmax attention over 8M tokens), and
#             train.window refuses softmax layers (runtime/config.py, validate); the hybrid rows are 128K tokens
#             per GPU instead: 1 GPU 128K vs 8 GPUs 1M (sp 8), selective recomputation — its attention work per
#             GPU grows with the sequence, so its tokens/s/GPU cannot stay flat.
#   softmax:  (≈ 6.5 min) softmax SP at 1M tokens on 8 GPUs, one run of benchmarks/sp_attention.py (32 q / 8 kv
#             heads, head dim 128, bf16, zigzag): the whole 1M sequence on one GPU (every rank; the check and the
#             speed-up reference; a check run + 3 repetitions, forced at ≥ 256K: ≈ 4 × 58 s on cuDNN, from 0.91 s
#             at 128K), ring, allgather, ulysses (≈ 30 s each), and torch's context_parallel (SDPA flash,
#             allgather rotation, ≈ 50 s; alltoall would add as much) in the same run. Each finished row is in
#             the log as it comes, so a run stopped by the limit keeps them.
#   pipeline: (≈ 7 min) pp 2 × sp 4 on 8 GPUs, 1b hybrid (LLLA) at 1M tokens per sequence, 2 sequences = 2
#             micro-batches per step (train.window cannot be the micro-batches: it refuses softmax layers, and
#             windows over pipeline stages refuse parallel.shard≠none), full recomputation, shard none. The
#             bubble-only bound: the same sequence through the whole model on sp = 4 (pp 1, 4 GPUs) takes T_seq
#             = P·t_mb with balanced stages, so the GPipe step at M micro-batches is at best (M+P−1)·t_mb =
#             (M+P−1)/P · T_seq (1.5 · T_seq here); $DIR/pipeline.md gives measured / bound, and the
#             `longtrain plan` step gives the predicted step with its (P−1)/M bubble term (busiest stage).
#             benchmarks/pipeline.py cannot do this: it builds a pp-only mesh (build_mesh(1, world, 1)).
#   shard8b:  (≈ 3–4 min) the 8b preset (configs/8b.toml: gate, parallel.shard=full, sp 8, remat always) at one
#             1M-token sequence: it trains (5 steps); tokens/s/GPU, MFU, peak memory (the largest rank's, and
#             every rank's on the run's summary line), beside `longtrain presets --world 8` and the plan.
#   sweep:    (≈ 5–8 min) `longtrain sweep configs/sweeps/h200-8gpu.toml` (125m, sp = GPUs 1, 2, 4, 8 at 512K and
#             weak scaling at 128K per GPU; predictions of `longtrain plan` recorded at launch, --gpu h200), then
#             `longtrain report` (predicted vs measured; needs matplotlib — if the device lacks it, run the report
#             where results.tar.gz lands). A stopped sweep resumes: points with a row are skipped.
#   ray:      (≈ 6–7 min) `longtrain ray` with 8 GPU workers (1b, gate, sp 8, 1M tokens, 30 steps, checkpoints
#             every 10): a driver (temporary file below) starts it, waits for the step-10 checkpoint's COMMITTED
#             marker, kill -9s one RayTrainWorker process (a descendant of the job, by pid), lets Ray restart the
#             group from the last committed checkpoint, and compares losses and the final parameters with an
#             uninterrupted run of the same job by local processes (`longtrain train --nproc 8`; Ray equals local
#             processes bitwise on CPU, tests/launch/test_ray_train.py). Needs `ray` on the device: carry its
#             wheel in .whl/ (issue 7 did); without it the part says so and stops.
#
#     OUT=$OUT/issue21 bash benchmarks/issue21_gpu.sh lasp2|weak|softmax|pipeline|shard8b|sweep|ray
#         # from the repository root; carry [".whl", ".autotune.tar.gz"] (and a ray wheel in .whl/ for `ray`)
#     DRY=1 bash benchmarks/issue21_gpu.sh all|PART   # CPU dry run of every command at tiny sizes (gloo, 2 ranks,
#         # 4 for pp × sp; model.preset=tiny, sequences of 64–512 tokens, 3 steps); outputs in $OUT or a temp dir;
#         # ≈ 4–5 minutes on 2 cores; exit 1 if a step failed. On CPU torch's context_parallel has no sharding
#         # strategy for SDPA's CPU kernel: sp_attention.py logs that row as FAILED and goes on (exit 0).
# The seven parts take ≈ 45 minutes of an 8-GPU machine: more than one session's device time (30 minutes) holds.
set -u
cd "$(dirname "$0")/.." || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 RAY_USAGE_STATS_ENABLED=0
PART="${1:-}"
DRY="${DRY:-0}"
PARTS="single lasp2 weak softmax pipeline shard8b sweep ray"
if [ -z "$PART" ] || { [ "$PART" != all ] && [[ " $PARTS " != *" $PART "* ]]; }; then
    echo "usage: [DRY=1] bash benchmarks/issue21_gpu.sh ${PARTS// /|}|all   (all: DRY=1 only)" >&2
    exit 2
fi
if [ "$PART" = all ] && [ "$DRY" != 1 ]; then
    echo "issue21: 'all' is the CPU dry run (DRY=1); on the GPUs run one part per call (each ≈ 10 minutes)" >&2
    exit 2
fi

if [ "$DRY" = 1 ]; then  # CPU: benchmarks/gpu_steps.sh without wheels or a device query, each step ≤ 240 s
    if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
        . .venv/bin/activate
    fi
    DIR="${OUT:-$(mktemp -d /tmp/issue21-dry.XXXXXX)}"
    STEP_CAP=240
    . benchmarks/gpu_steps.sh
    save_autotune() { :; }
    pack_results() { echo "results: left unpacked in $DIR"; }
    RAY_RUNS="$DIR/ray-runs"
else
    DIR="${OUT:-benchmarks/results/issue21}"
    . benchmarks/gpu_steps.sh  # wheels, PYTHONPATH, env.txt, `step`, save_autotune, pack_results
    RAY_RUNS="${RAY_RUNS:-/tmp/issue21-ray}"
fi
RUNS="$DIR/runs"
mkdir -p "$RUNS"
TORCHRUN=(python3 -m torch.distributed.run --standalone)
LT=(python3 -m launch.cli)
QUIET=(train.eval_batches=0 run.log_every=1 run.progress=false run.tensorboard=false)  # every step a metrics row
# every rank builds the whole synthetic row inside its timed step (runtime/sources.py SyntheticSource.batch, timed in
# runtime/trainer.py step): passkey is the cheapest task at 8M tokens (0.17 s on one core vs zipf 0.67 s, mqar 0.31 s)
DATA=(data.source=synthetic:passkey data.passkey_digits=8)

# -- helpers written to a temporary folder (this script is the one file issue 21 adds) ----------------------------
HELP="$(mktemp -d /tmp/issue21-help.XXXXXX)"
trap 'rm -rf "$HELP"' EXIT

cat >"$HELP/lasp2_gate.py" <<'PY'
"""benchmarks/sp_attention.py with a data-dependent gate in LASP-2 (issue 21): every lasp2_linear_attention call of
the script gets gate = logsigmoid(q[..., 0]) / 16 ([B, T, H], fp32: the L layer's gate form, models/llama.py),
computed inside the timed step from the rank's own q (it shards with q; its gradient reaches dq). Sizes, the
check against one GPU, the alternating timing and --profile-lasp are the script's own."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path.cwd()))
import torch.nn.functional as F  # noqa: E402

import benchmarks.sp_attention as bench  # noqa: E402

_plain, _report = bench.lasp2_linear_attention, bench.report


def _gated(q, k, v, **kw):
    return _plain(q, k, v, gate=(F.logsigmoid(q[..., 0].float()) / 16).contiguous(), **kw)


bench.lasp2_linear_attention = _gated
bench.report = lambda *a, **k: _report(*a, **k).replace("RetNet decay", "RetNet decay + gate logsigmoid(q[..., 0])/16")
bench.main()
PY

cat >"$HELP/summary.py" <<'PY'
"""summary.py OUT.md [--pipeline P M] GROUP:LABEL:GPUS:RUN_DIR ...: a table of each run's metrics.parquet (the first
step, with compilation, left out): median step time, tokens/s, tokens/s/GPU (and its ratio to the first run of the
same group: weak-scaling efficiency), MFU, the largest rank's peak memory, loss. --pipeline P M: the runs labelled
`pipeline` (pp = P, M micro-batches) and `anchor` (pp = 1: one sequence through the whole model) give the
bubble-only bound (M + P − 1) / P × anchor step and measured / bound."""
import math
import statistics
import sys
from pathlib import Path

import pyarrow.parquet as pq

args = sys.argv[1:]
out = Path(args.pop(0))
pipe = None
if args and args[0] == "--pipeline":
    pipe = (int(args[1]), int(args[2]))
    args = args[3:]
lines = ["| group | run | GPUs | steps timed | step (s) | tokens/s | tokens/s/GPU | vs first of group | MFU | peak GiB "
         "(max rank) | loss first → last |", "|---|---|---|---|---|---|---|---|---|---|---|"]
first, steps = {}, {}
for entry in args:
    group, label, gpus, run = entry.split(":", 3)
    path = Path(run) / "metrics.parquet"
    if not path.exists():
        lines.append(f"| {group} | {label} | {gpus} | no metrics.parquet: the run failed (see its log) |||||||||")
        continue
    rows = pq.read_table(path).to_pylist()
    timed = rows[1:] or rows
    med = lambda key: statistics.median(r[key] for r in timed)  # noqa: E731
    tps, step = med("tokens_per_s"), med("step_time_s")
    per_gpu = tps / int(gpus)
    first.setdefault(group, per_gpu)
    steps[label] = step
    mfu = med("mfu")
    lines.append(f"| {group} | {label} | {gpus} | {len(timed)} | {step:.3f} | {tps:,.0f} | {per_gpu:,.0f} | "
                 f"{per_gpu / first[group]:.3f} | {'n/a' if math.isnan(mfu) else f'{mfu:.1%}'} | "
                 f"{max(r['max_mem_gib'] for r in rows):.2f} | {rows[0]['loss']:.4f} → {rows[-1]['loss']:.4f} |")
if pipe is not None:
    P, M = pipe
    if "pipeline" in steps and "anchor" in steps:
        bound = (M + P - 1) / P * steps["anchor"]
        lines += ["", f"GPipe P = {P}, M = {M}: bubble-only bound (M+P−1)/P × one sequence through the whole model "
                      f"(anchor) = {bound:.3f} s; measured {steps['pipeline']:.3f} s; bound / measured = "
                      f"{bound / steps['pipeline']:.3f}"]
    else:
        lines += ["", "GPipe bound: the pipeline or the anchor run has no metrics"]
text = "\n".join(lines) + "\n"
out.write_text(text)
print(text)
PY

cat >"$HELP/ray_kill.py" <<'PY'
"""ray_kill.py --workers N --gpus-per-worker G --steps S --kill-after K --run-dir RUN --reference REF --out MD
[--timeout SEC] [--require-equal] -- OVERRIDES...: start `longtrain ray` (its own session), wait for RUN's step-K
checkpoint to commit, kill -9 one RayTrainWorker process among the job's descendants (by pid), wait for Ray to restart
the group from the last committed checkpoint and finish, then compare losses and the step-S parameters with REF (an
uninterrupted run of the same job). Exit 0 when a worker was killed, a new group resumed and the job finished (and,
with --require-equal, losses and parameters are bitwise equal); a job still running at --timeout (or on SIGTERM) is
ended by pid: the CLI's process and everything under it."""
import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

p = argparse.ArgumentParser()
for flag in ("--workers", "--steps", "--kill-after"):
    p.add_argument(flag, type=int, required=True)
p.add_argument("--gpus-per-worker", default="0")
p.add_argument("--run-dir", required=True)
p.add_argument("--reference", required=True)
p.add_argument("--out", required=True)
p.add_argument("--timeout", type=float, default=300)
p.add_argument("--max-failures", type=int, default=2)
p.add_argument("--require-equal", action="store_true")
p.add_argument("overrides", nargs="*")
a = p.parse_args()
run = Path(a.run_dir).resolve()
cmd = [sys.executable, "-m", "launch.cli", "ray", "--num-workers", str(a.workers), "--gpus-per-worker",
       a.gpus_per_worker, "--max-failures", str(a.max_failures), "--overwrite", "--set", *a.overrides,
       f"run.dir={run}"]
print("ray_kill: " + " ".join(cmd), flush=True)
start = time.time()
proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                        errors="replace")
resumed: list[str] = []


def relay() -> None:  # the job's output to ours, noting each "resumed from ... at step N" of a restarted group
    for line in proc.stdout:
        sys.stdout.write(line)
        said = line.split("longtrain: ", 1)[-1].strip()
        if said.startswith("resumed from") and said not in resumed:
            resumed.append(said)


relay_thread = threading.Thread(target=relay, daemon=True)
relay_thread.start()


def descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), []):
            found.append(c)
            todo.append(c)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def end_job(*_) -> None:  # a job still running (a time limit): its processes, by pid, the CLI and all under it
    if proc.poll() is None:
        for pid in [proc.pid, *descendants(proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    if _:
        sys.exit(124)


signal.signal(signal.SIGTERM, end_job)
marker = run / "checkpoints" / f"step_{a.kill_after:08d}" / "COMMITTED"
killed, note = None, ""
while proc.poll() is None and time.time() - start < a.timeout:
    if marker.exists():
        workers = sorted(pid for pid in descendants(proc.pid) if "RayTrainWorker" in cmdline(pid))
        if workers:
            killed = workers[-1]
            note = f"{len(workers)} RayTrainWorker processes: " + "; ".join(f"{w} {cmdline(w)[:60]}" for w in workers)
            os.kill(killed, signal.SIGKILL)
            print(f"ray_kill: {time.time() - start:.1f} s: step {a.kill_after} committed; kill -9 {killed} ({note})",
                  flush=True)
            break
    time.sleep(0.05)
try:
    rc = proc.wait(timeout=max(1.0, a.timeout - (time.time() - start)))
except subprocess.TimeoutExpired:
    rc = 124
end_job()
relay_thread.join(timeout=10)
wall = time.time() - start


def losses(d) -> dict:
    path = Path(d) / "metrics.parquet"
    return {r["step"]: r["loss"] for r in pq.read_table(path).to_pylist()} if path.exists() else {}


def final(d) -> dict:
    path = Path(d) / "checkpoints" / f"step_{a.steps:08d}"
    if not (path / "COMMITTED").exists():
        return {}
    return {name: arr[...] for name, arr in zarr.open_group(str(path), mode="r")["model"].arrays()}


la, lb = losses(a.reference), losses(run)
same_steps = sorted(set(la) & set(lb))
loss_equal = bool(same_steps) and len(la) == len(lb) == a.steps and all(la[s] == lb[s] for s in same_steps)
loss_diff = max((abs(la[s] - lb[s]) for s in same_steps), default=float("nan"))
pa, pb = final(a.reference), final(run)
names = sorted(set(pa) & set(pb))
param_equal = bool(names) and set(pa) == set(pb) and all(np.array_equal(pa[n], pb[n]) for n in names)
param_diff = max((float(np.max(np.abs(pa[n].astype(np.float64) - pb[n].astype(np.float64)))) for n in names),
                 default=float("nan"))
ckpts = sorted(c.name for c in (run / "checkpoints").glob("step_*")) if (run / "checkpoints").exists() else []
text = "\n".join([
    f"`longtrain ray` with {a.workers} workers (gpus per worker {a.gpus_per_worker}), {a.steps} steps, a worker "
    f"killed (SIGKILL) once the step-{a.kill_after} checkpoint committed; compared with an uninterrupted run of the "
    f"same job by local processes ({a.reference}).", "",
    f"- killed: {killed if killed else 'NO (the checkpoint did not commit in time, or no worker was found)'}"
    + (f" — {note}" if note else ""),
    f"- restarts: {'; '.join(resumed) or 'none seen'}",
    f"- Ray job exit code {rc}, wall {wall:.1f} s; checkpoints left: {', '.join(ckpts) or 'none'}",
    f"- losses: {len(lb)} steps in the killed run, {len(la)} in the reference; equal at every step: {loss_equal} "
    f"(max |Δ| {loss_diff:.3g})",
    f"- final parameters (step {a.steps}): {len(names)} arrays compared; bitwise equal: {param_equal} "
    f"(max |Δ| {param_diff:.3g})", ""])
Path(a.out).write_text(text)
print(text, flush=True)
ok = rc == 0 and killed is not None and bool(resumed) and (param_equal and loss_equal or not a.require_equal)
sys.exit(0 if ok else 1)
PY

# -- the parts ------------------------------------------------------------------------------------------------------
part_lasp2() {
    local tokens=524288 ns="2 4 8" extra=(--profile-lasp) n
    if [ "$DRY" = 1 ]; then tokens=512 ns="2" extra=(--smoke); fi  # --profile-lasp needs CUDA
    for n in $ns; do
        step "lasp2_gate_${n}gpu" 110 "${TORCHRUN[@]}" --nproc-per-node "$n" "$HELP/lasp2_gate.py" --seq-lens "" \
            --lasp-tokens "$tokens" "${extra[@]}" --out "$DIR/lasp2_gate_${n}gpu.md"
    done
    n=${ns##* }
    step "lasp2_retnet_${n}gpu" 95 "${TORCHRUN[@]}" --nproc-per-node "$n" benchmarks/sp_attention.py --seq-lens "" \
        --lasp-tokens "$tokens" "${extra[@]}" --out "$DIR/lasp2_retnet_${n}gpu.md"
    grep -H -E "efficiency|AllGather|ReduceScatter|FAILED" "$DIR"/lasp2_*.log | tee "$DIR/lasp2_summary.txt"
}

part_single() {  # what one GPU can measure now: LASP-2 (gated) at 512K tokens on one GPU, the weak part's 1-GPU rows
    local tokens=524288 extra=()
    if [ "$DRY" = 1 ]; then tokens=512 extra=(--smoke); fi
    step lasp2_gate_1gpu 100 "${TORCHRUN[@]}" --nproc-per-node 1 "$HELP/lasp2_gate.py" --seq-lens "" \
        --lasp-tokens "$tokens" "${extra[@]}" --out "$DIR/lasp2_gate_1gpu.md"
    part_weak one
}

part_weak() {  # part_weak one: only the one-GPU rows
    local W=(model.preset=1b model.gate=true parallel.pp=1 parallel.microbatches=1 parallel.shard=none
             train.batch_size=1 train.steps=3 "${DATA[@]}" "${QUIET[@]}")
    local n8=8 l1=1048576 w1=65536 h1=131072 rows
    if [ "$DRY" = 1 ]; then
        W=(model.preset=tiny model.gate=true parallel.pp=1 parallel.microbatches=1 parallel.shard=none
           train.batch_size=1 train.steps=3 "${DATA[@]}" "${QUIET[@]}")
        n8=2 l1=256 w1=64 h1=128
    fi
    step weak_L_1gpu 120 "${LT[@]}" train --nproc 1 --overwrite --set "${W[@]}" model.layout=L parallel.sp=1 \
        train.seq_len=$l1 train.window=$w1 parallel.remat=never run.dir="$RUNS/weak_L_1gpu"
    step weak_LLLA_1gpu 70 "${LT[@]}" train --nproc 1 --overwrite --set "${W[@]}" model.layout=LLLA parallel.sp=1 \
        train.seq_len=$h1 parallel.remat=always parallel.remat_policy=selective run.dir="$RUNS/weak_LLLA_1gpu"
    rows=("L:L-1gpu:1:$RUNS/weak_L_1gpu" "LLLA:LLLA-1gpu:1:$RUNS/weak_LLLA_1gpu")
    if [ "${1:-}" != one ]; then
        step "weak_L_${n8}gpu" 140 "${LT[@]}" train --nproc $n8 --overwrite --set "${W[@]}" model.layout=L \
            parallel.sp=$n8 train.seq_len=$((l1 * n8)) train.window=$((w1 * n8)) parallel.remat=never \
            run.dir="$RUNS/weak_L_${n8}gpu"
        step "weak_LLLA_${n8}gpu" 170 "${LT[@]}" train --nproc $n8 --overwrite --set "${W[@]}" model.layout=LLLA \
            parallel.sp=$n8 train.seq_len=$((h1 * n8)) parallel.remat=always parallel.remat_policy=selective \
            run.dir="$RUNS/weak_LLLA_${n8}gpu"
        rows=("${rows[0]}" "L:L-${n8}gpu:$n8:$RUNS/weak_L_${n8}gpu" "${rows[1]}"
              "LLLA:LLLA-${n8}gpu:$n8:$RUNS/weak_LLLA_${n8}gpu")
    fi
    step weak_summary 30 python3 "$HELP/summary.py" "$DIR/weak${1:+_$1}.md" "${rows[@]}"
}

part_softmax() {
    if [ "$DRY" = 1 ]; then
        step softmax_sp 120 "${TORCHRUN[@]}" --nproc-per-node 2 benchmarks/sp_attention.py --smoke --seq-lens 256 \
            --lasp-tokens 0 --methods ring,allgather,ulysses --cp-rotations allgather --out "$DIR/softmax_sp.md"
    else
        step softmax_sp 525 "${TORCHRUN[@]}" --nproc-per-node 8 benchmarks/sp_attention.py --seq-lens 1048576 \
            --lasp-tokens 0 --methods ring,allgather,ulysses --cp-rotations allgather --out "$DIR/softmax_sp.md"
    fi
}

part_pipeline() {
    local H=(model.preset=1b model.gate=true model.layout=LLLA parallel.remat=always parallel.remat_policy=full
             parallel.shard=none train.seq_len=1048576 train.steps=3 "${DATA[@]}" "${QUIET[@]}")
    local sp=4
    if [ "$DRY" = 1 ]; then
        H=(model.preset=tiny model.gate=true model.layout=LLLA parallel.remat=always parallel.remat_policy=full
           parallel.shard=none train.seq_len=128 train.steps=3 "${DATA[@]}" "${QUIET[@]}")
        sp=2
    fi
    step pipeline_plan 30 "${LT[@]}" plan --gpus $((2 * sp)) --gpu h200 --set "${H[@]}" parallel.pp=2 \
        parallel.sp=$sp train.batch_size=2 parallel.microbatches=2
    step "pipeline_pp2_sp${sp}" 290 "${LT[@]}" train --nproc $((2 * sp)) --overwrite --set "${H[@]}" parallel.pp=2 \
        parallel.sp=$sp train.batch_size=2 parallel.microbatches=2 run.dir="$RUNS/pipeline_pp2_sp${sp}"
    step "pipeline_anchor_pp1_sp${sp}" 180 "${LT[@]}" train --nproc $sp --overwrite --set "${H[@]}" parallel.pp=1 \
        parallel.sp=$sp train.batch_size=1 parallel.microbatches=1 run.dir="$RUNS/pipeline_anchor_pp1_sp${sp}"
    step pipeline_summary 30 python3 "$HELP/summary.py" "$DIR/pipeline.md" --pipeline 2 2 \
        "pp2-sp$sp:pipeline:$((2 * sp)):$RUNS/pipeline_pp2_sp${sp}" \
        "pp1-sp$sp:anchor:$sp:$RUNS/pipeline_anchor_pp1_sp${sp}"
}

part_shard8b() {
    local S=(train.seq_len=1048576 train.batch_size=1 train.steps=5 "${QUIET[@]}") n=8
    if [ "$DRY" = 1 ]; then
        S=(model.preset=tiny parallel.sp=2 train.seq_len=256 train.batch_size=1 train.steps=3 "${QUIET[@]}")
        n=2
    fi
    step shard8b_presets 30 "${LT[@]}" presets --world $n
    step shard8b_plan 30 "${LT[@]}" plan --gpus $n --gpu h200 --config configs/8b.toml --set "${S[@]}"
    step shard8b_train 420 "${LT[@]}" train --nproc $n --overwrite --config configs/8b.toml --set "${S[@]}" \
        run.dir="$RUNS/shard8b"
    step shard8b_summary 30 python3 "$HELP/summary.py" "$DIR/shard8b.md" "8b:8b-sp$n-shard-full:$n:$RUNS/shard8b"
}

part_sweep() {
    local grid=configs/sweeps/h200-8gpu.toml timeout=150
    if [ "$DRY" = 1 ]; then  # the same [[zip]] shape (strong, then weak scaling) at tiny sizes on 1 and 2 ranks
        grid="$HELP/tiny-8gpu.toml"
        timeout=120
        cat >"$grid" <<'TOML'
[sweep]
warmup_steps = 1
steps = 2
timeout_s = 120

[base]
"model.preset" = "tiny"
"parallel.pp" = 1
"parallel.microbatches" = 1
"parallel.remat" = "always"
"train.batch_size" = 1

[[zip]]
gpus =            [1,   2,   1,  2]
"parallel.sp" =   [1,   2,   1,  2]
"train.seq_len" = [256, 256, 64, 128]
TOML
    fi
    step sweep 470 "${LT[@]}" sweep "$grid" --out "$DIR/h200-8gpu" --gpu h200 --timeout $timeout
    step sweep_report 40 "${LT[@]}" report "$DIR/h200-8gpu"
}

part_ray() {
    local n=8 gpw=1 steps=30 every=10 timeout=270 eq=()
    local R=(model.preset=1b model.gate=true parallel.pp=1 parallel.sp=8 parallel.microbatches=1 train.batch_size=1
             train.seq_len=1048576 parallel.remat=always "${DATA[@]}" run.keep=2 run.report_every=5)
    if [ "$DRY" = 1 ]; then
        n=2 gpw=0 steps=40 every=10 timeout=200 eq=(--require-equal)  # bitwise on CPU (tests/launch/test_ray_train.py)
        R=(model.preset=tiny model.gate=true parallel.pp=1 parallel.sp=2 parallel.microbatches=1 train.batch_size=2
           train.seq_len=64 "${DATA[@]}" parallel.timeout_s=60 run.keep=2 run.report_every=5)
    fi
    R+=("train.steps=$steps" "run.checkpoint_every=$every" "${QUIET[@]}")
    if ! python3 -c "import ray" 2>/dev/null; then
        echo "== ray: skipped: ray is not importable here (carry its wheel in .whl/)" | tee "$DIR/ray_skipped.txt"
        echo "ray_import 1" >>"$DIR/status.txt"
        return
    fi
    mkdir -p "$RAY_RUNS"
    step ray_reference 170 "${LT[@]}" train --nproc $n --overwrite --set "${R[@]}" run.dir="$RAY_RUNS/reference"
    step ray_kill 330 python3 "$HELP/ray_kill.py" --workers $n --gpus-per-worker $gpw --steps $steps \
        --kill-after $every --run-dir "$RAY_RUNS/killed" --reference "$RAY_RUNS/reference" --out "$DIR/ray_kill.md" \
        --timeout $timeout "${eq[@]}" -- "${R[@]}"
    local r
    for r in reference killed; do  # keep metrics and logs, not the checkpoints
        mkdir -p "$RUNS/ray_$r"
        cp -r "$RAY_RUNS/$r/metrics.parquet" "$RAY_RUNS/$r/logs" "$RUNS/ray_$r/" 2>/dev/null
    done
    rm -rf "$RAY_RUNS"
}

if [ "$PART" = all ]; then
    todo=$PARTS
else
    todo=$PART
fi
: >"$DIR/parts.txt"
for p in $todo; do
    t0=$SECONDS
    before=$(wc -l <"$DIR/status.txt")
    "part_$p"
    failed=$(tail -n +"$((before + 1))" "$DIR/status.txt" | awk '$2 != 0 {print $1 " (exit " $2 ")"}' | paste -sd, -)
    if [ -f "$DIR/${p}_skipped.txt" ]; then
        verdict="skipped: $(sed 's/^== [a-z]*: skipped: //' "$DIR/${p}_skipped.txt")"
    elif [ -n "$failed" ]; then
        verdict="FAILED: $failed"
    else
        verdict=ok
    fi
    echo "part $p: $verdict ($((SECONDS - t0)) s)" | tee -a "$DIR/parts.txt"
done
save_autotune
cat "$DIR/status.txt"
cat "$DIR/parts.txt"
bad=$(awk '$2 != 0 && $1 != "ray_import"' "$DIR/status.txt" | wc -l)
pack_results
if [ "$DRY" = 1 ]; then
    echo "dry run: $bad failed step(s); outputs in $DIR"
    [ "$bad" -eq 0 ]
fi
