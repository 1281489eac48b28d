"""`longtrain ray` vs torchrun on the same job (issue 7): startup time and step time.

    python benchmarks/launchers.py --gpus 2 [--set model.preset=125m ...]

Runs the job twice — `torchrun --nproc-per-node G -m launch.train` and `longtrain ray
--num-workers G --gpus-per-worker 1` (a local Ray instance started by the command) — and
reads each run's metrics.parquet (log_every = 1). Startup = wall-clock time from launching
the command to the end of step 1, minus step 1's own time; step time = median of steps 3….
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

import pyarrow.parquet as pq
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = ["model.preset=125m", "parallel.pp=1", "parallel.sp=2", "parallel.microbatches=1", "train.batch_size=2",
       "train.seq_len=32768", "train.steps=30", "run.log_every=1", "run.progress=false", "run.tensorboard=false",
       "run.checkpoint_every=0", "train.eval_batches=1"]


def run(kind: str, gpus: int, job: list[str], out_dir: str) -> dict:
    run_dir = os.path.join(out_dir, kind)
    overrides = [*job, f"run.dir={run_dir}"]
    if kind == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(gpus), "-m", "launch.train",
               "--set", *overrides]
    else:
        per_worker = "1" if torch.cuda.is_available() else "0"  # CPU: a dry run of the script with gloo
        cmd = [sys.executable, "-m", "launch.cli", "ray", "--num-workers", str(gpus), "--gpus-per-worker", per_worker,
               "--max-failures", "0", "--set", *overrides]
    start = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.time() - start
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    rows = pq.read_table(os.path.join(run_dir, "metrics.parquet")).to_pylist()
    steps = [r["step_time_s"] for r in rows[2:]]
    first = rows[0]
    return dict(kind=kind, wall=wall, startup=first["wall_time"] - start - first["step_time_s"],
                step=statistics.median(steps), tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows[2:]),
                loss=rows[-1]["loss"], mfu=statistics.median(r["mfu"] for r in rows[2:]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", type=int, default=2)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], help="extra job overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    job = [*JOB, *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        results = [run(kind, args.gpus, job, tmp) for kind in ("torchrun", "ray")]
    lines = [f"job: {' '.join(job)}", "",
             "| launcher | startup (s) | step time (ms, median) | tokens/s | MFU | final loss | total wall (s) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['kind']} | {r['startup']:.1f} | {r['step'] * 1e3:.1f} | {r['tokens_per_s']:,.0f} | "
                     f"{r['mfu']:.1%} | {r['loss']:.4f} | {r['wall']:.1f} |")
    t, r = results
    lines.append(f"\nray / torchrun step time: {r['step'] / t['step']:.3f}; losses equal: {t['loss'] == r['loss']}")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
