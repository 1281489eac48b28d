"""`longtrain plan` against the CPU points of the tests: calibrate this machine, run the tests' sweep grid
(configs/sweeps/tiny-cpu.toml) `--repeats` times with more timed steps, and print each point's predicted step
beside the measured one, as predicted and at the host's speed measured beside the point (`longtrain report`).

    python benchmarks/plan_cpu.py --out /tmp/plan-cpu --repeats 3 --steps 20

Writes OUT/cpu.toml (the calibration), OUT/grid.toml, OUT/sweep-<i>/ (sweep.parquet, report.md, the PNGs) and
OUT/summary.json. On a shared VM the host's speed drifts by ±25 % within a minute (benchmarks/RESULTS.md,
eighteenth session), so the raw errors say how fast the machine happened to be, the at-speed errors how good
the model is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = ROOT / "configs" / "sweeps" / "tiny-cpu.toml"
TIME_GOAL = 0.15


def cli(*args: str) -> None:
    """`longtrain ARGS` (its error line on stderr); a failure ends this script with that command named, exit 2."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two shared cores: a one-rank point must not spin a second thread
    done = subprocess.run([sys.executable, "-m", "launch.cli", *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    if done.returncode:
        sys.exit(f"plan_cpu: `longtrain {' '.join(args)}` failed (exit {done.returncode}; its error is above)")


def errors(sweep_dir: Path) -> list[dict]:
    import pyarrow.parquet as pq

    sys.path.insert(0, str(ROOT))
    from launch.report import host_speed

    rows = []
    for r in sorted(pq.read_table(sweep_dir / "sweep.parquet").to_pylist(), key=lambda r: r["index"]):
        if r["status"] != "ok":
            continue
        meas, pred, speed = r["step_time_s"], r["pred_step_time_s"], host_speed(r)
        rows.append(dict(id=r["id"], world=r["world"], seq_len=r["train.seq_len"], measured_ms=1e3 * meas,
                         predicted_ms=1e3 * pred, error=(pred - meas) / meas, host_speed=speed,
                         error_at_speed=(pred * speed - meas) / meas if math.isfinite(speed) else math.nan))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/plan-cpu", help="folder for the calibration, sweeps and summary")
    parser.add_argument("--repeats", type=int, default=3, help="sweeps of the grid, one after the other")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per point (the tests run 2)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per point")
    parser.add_argument("--calibration", default=None, help="an existing calibrate file instead of a new one")
    args = parser.parse_args()
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0:
        parser.error("--repeats and --steps must be ≥ 1 and --warmup ≥ 0")
    if args.calibration and not Path(args.calibration).is_file():
        parser.error(f"--calibration {args.calibration!r} is not a file; "
                     f"write one with `longtrain calibrate --out FILE`")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    hw = Path(args.calibration).resolve() if args.calibration else out / "cpu.toml"
    if not args.calibration:
        cli("calibrate", "--out", str(hw), "--overwrite")
    text = GRID.read_text()
    text = re.sub(r"(?m)^steps = \d+", f"steps = {args.steps}", text)
    text = re.sub(r"(?m)^warmup_steps = \d+", f"warmup_steps = {args.warmup}", text)
    (out / "grid.toml").write_text(text)
    summary = []
    for i in range(args.repeats):
        sweep_dir = out / f"sweep-{i}"
        cli("sweep", str(out / "grid.toml"), "--out", str(sweep_dir), "--gpu", str(hw))
        cli("report", str(sweep_dir))
        for r in errors(sweep_dir):
            summary.append(dict(r, repeat=i))
            print(f"sweep {i} {r['id']} ranks {r['world']} seq {r['seq_len']:>3}: measured {r['measured_ms']:6.1f} ms, "
                  f"predicted {r['predicted_ms']:6.1f} ({100 * r['error']:+4.0f} %), host ×{r['host_speed']:.2f} → "
                  f"{100 * r['error_at_speed']:+4.0f} %", flush=True)
    (out / "summary.json").write_text(json.dumps(dict(calibration=hw.read_text(), points=summary), indent=1))
    for ranks in sorted({r["world"] for r in summary}):
        mine = [r for r in summary if r["world"] == ranks]
        raw = sum(abs(r["error"]) <= TIME_GOAL for r in mine)
        fast = sum(abs(r["error_at_speed"]) <= TIME_GOAL for r in mine)
        print(f"{ranks} rank(s): step time within {TIME_GOAL:.0%} on {raw} of {len(mine)} points as predicted, "
              f"{fast} of {len(mine)} at the host's measured speed")


if __name__ == "__main__":
    main()
