"""`longtrain sweep GRID.toml`: a grid of training jobs, each point its own job, the outcomes in DIR/sweep.parquet.

A grid file (configs/sweeps/*.toml):

    [sweep]
    config = "configs/125m.toml"   # the base job (default: the built-in tiny job); relative to cwd or this file
    warmup_steps = 2               # steps run before the timing (excluded)
    steps = 5                      # timed steps per point
    timeout_s = 1800               # per point (the --timeout flag wins)
    launcher = "local"             # local | torchrun | ray (the --launcher flag wins)

    [base]                         # section.key = value for every point (nested tables work as well)
    "parallel.pp" = 1

    [axes]                         # the cartesian product of these lists
    "train.seq_len" = [4096, 16384]
    gpus = [1, 2, 4, 8]            # ranks per point (default: dp·pp·sp of the config); `nodes` likewise

    [[zip]]                        # lists that advance together: one more axis (weak scaling: seq_len with sp)
    "parallel.sp" = [1, 2, 4]
    "train.seq_len" = [8192, 16384, 32768]

Each point runs as its own `longtrain train` (or `ray`, or torchrun) process with run.dir DIR/points/<id>, where
<id> hashes the point's resolved configuration, world size and launcher. Its row in DIR/sweep.parquet holds the
configuration columns, the throughput of the timed steps (the warm-up rows of its metrics.parquet are left out),
peak memory per rank, the predicted numbers of `runtime.plan` where a hardware profile applies, the status (ok,
failed, oom, timeout) with the one-line cause, wall time, device and software versions. A configuration that
does not validate is a failed row without a process; a failure never ends the sweep. A point that has a row is
skipped when the grid runs again (`--retry-failed` runs failed points again).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from launch.grid import (
    CONFIG_COLUMNS,
    LAUNCHERS,
    PSEUDO_AXES,
    ROOT,
    Grid,
    Point,
    expand,
    load_grid,
    resolve,
)
from runtime.errors import ConfigError

PEAK_RE = re.compile(r"peak memory per rank \[([^\]]*)\] (GiB RSS|GiB)")


def run_overrides(point: Point, out: Path) -> list[str]:
    """What a point's process gets after the grid's pairs: the timed steps, one metrics row per step, the host speed
    beside each step (run.speed_anchor), its run.dir."""
    return [f"train.steps={point.cfg.train.steps}", "run.log_every=1", "run.checkpoint_every=0",
            "run.resume=", "run.speed_anchor=true", f"run.dir={out / 'points' / point.id}"]


def command(point: Point, grid: Grid, out: Path, launcher: str, address: str | None,
            gpus_per_worker: float) -> list[list[str]]:
    """The command(s) of one point: one for local, ray and one-node torchrun; one per node for torchrun."""
    config = ["--config", grid.config] if grid.config else []
    pairs = ["--set", *point.overrides, *run_overrides(point, out)]
    if launcher == "local":
        return [[sys.executable, "-m", "launch.cli", "train", "--nproc", str(point.world), "--overwrite",
                 *config, *pairs]]
    if launcher == "ray":
        where = ["--address", address] if address else []
        return [[sys.executable, "-m", "launch.cli", "ray", "--num-workers", str(point.world), "--gpus-per-worker",
                 f"{gpus_per_worker:g}", "--max-failures", "0", "--overwrite", *where, *config, *pairs]]
    per_node = point.world // point.nodes
    if point.nodes == 1:
        return [[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(per_node),
                 "-m", "launch.train", "--overwrite", *config, *pairs]]
    endpoint = address or "HEAD:29500"
    return [["torchrun", "--nnodes", str(point.nodes), "--node-rank", str(n), "--nproc-per-node", str(per_node),
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", point.id, "-m", "launch.train",
             "--overwrite", *config, *pairs] for n in range(point.nodes)]


# -- the machine ----------------------------------------------------------------------------------------------
def device_info() -> dict:
    """The device name and memory of this machine (nvidia-smi; no CUDA context in the sweep process)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
            if out:
                name, mib = (s.strip() for s in out[0].split(","))
                return dict(device=f"{len(out)} × {name}", device_mem_gib=float(mib) / 1024, gpus_here=len(out))
        except (OSError, ValueError, subprocess.SubprocessError):
            pass
    return dict(device=f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                device_mem_gib=math.nan, gpus_here=0)


def versions() -> str:
    parts = [f"python {platform.python_version()}"]
    for name in ("longtrain", "torch", "triton", "ray"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    try:  # $LONGTRAIN_COMMIT: the tree that runs, where git's HEAD is older (a copied working tree)
        commit = os.environ.get("LONGTRAIN_COMMIT") or subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            timeout=10).stdout.strip()
        if commit:
            parts.append(f"commit {commit}")
    except (OSError, subprocess.SubprocessError):
        pass
    return ", ".join(parts)


def hardware_for(spec: str | None, device: str):
    """The plan's hardware profile for the predicted columns: `--gpu`, else the device's if one is shipped."""
    from runtime.plan import load_hardware

    if spec:
        return load_hardware(spec)
    for name in ("h200", "h100", "a100"):
        if name in device.lower():
            return load_hardware(name)
    return None


# -- one point ------------------------------------------------------------------------------------------------
def _cause(stderr: str) -> str:
    """The one line that says why a point's process failed: its `longtrain: error:` line, else the last line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("longtrain: error: "):
            return line[len("longtrain: error: "):]
    return lines[-1][:400] if lines else "no error message (see the point's log)"


def classify(exit_code: int, cause: str) -> str:
    text = cause.lower()
    if "out of memory" in text or "outofmemoryerror" in text or "needs about" in text:
        return "oom"
    return "failed" if exit_code else "ok"


def _run_process(cmd: list[str], log: Path, timeout_s: float) -> tuple[int | None, str, str, float]:
    """(exit code or None after the timeout, stdout, stderr, seconds); the process group is killed at the end."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.pop("WORLD_SIZE", None)  # a sweep started under torchrun must not make its points think so
    env.pop("MASTER_ADDR", None)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with open(log.with_suffix(".out"), "w") as out, open(log.with_suffix(".err"), "w") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        code = None
        try:
            code = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        finally:
            if proc.returncode is None:  # timed out or interrupted: the point's own process group, nothing else
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()
    return code, log.with_suffix(".out").read_text(), log.with_suffix(".err").read_text(), time.monotonic() - start


def measured(run_dir: Path, warmup: int, stdout: str) -> dict:
    """Throughput and memory of a finished point from its metrics.parquet (steps after the warm-up)."""
    import pyarrow.parquet as pq

    rows = pq.read_table(run_dir / "metrics.parquet").to_pylist()
    timed = [r for r in rows if r["step"] > warmup] or rows[-1:]
    step = statistics.median(r["step_time_s"] for r in timed)
    tokens_step = timed[0]["tokens"] / timed[0]["step"]
    mfu_per_tps = [r["mfu"] / r["tokens_per_s"] for r in timed if r["tokens_per_s"] and r["mfu"] == r["mfu"]]
    out = dict(timed_steps=len(timed), step_time_s=step, step_time_min_s=min(r["step_time_s"] for r in timed),
               tokens_per_step=tokens_step, tokens_per_s=tokens_step / step,
               mfu=mfu_per_tps[0] * tokens_step / step if mfu_per_tps else math.nan,
               peak_mem_gib=max(r["max_mem_gib"] for r in rows), final_loss=rows[-1]["loss"])
    anchors = [r["anchor_s"] for r in timed if math.isfinite(r.get("anchor_s") or math.nan)]
    out["anchor_s"] = statistics.median(anchors) if anchors else math.nan  # the host's speed beside the steps
    out.update(step_split(timed))
    found = PEAK_RE.findall(stdout)
    if found:
        per_rank = [float(x) for x in found[-1][0].split()]
        out.update(peak_mem_per_rank=per_rank, peak_mem_gib=max(per_rank),
                   mem_kind="rss" if found[-1][1].endswith("RSS") else "cuda")
    return out


def step_split(timed: list[dict]) -> dict:
    """The measured split of the step (medians over the timed steps of rank 0's metrics): communication (host
    time in blocking collectives), bubble (in the pipeline's send / recv) and compute (the rest); NaN where the
    run did not measure them (CUDA jobs: `parallel.comm_clock`)."""
    comm = [r.get("comm_s") for r in timed]
    bubble = [r.get("bubble_s") for r in timed]
    if not timed or not all(x is not None and math.isfinite(x) for x in comm + bubble):
        return dict(compute_s=math.nan, comm_s=math.nan, bubble_s=math.nan)
    rest = [r["step_time_s"] - c - b for r, c, b in zip(timed, comm, bubble, strict=True)]
    return dict(compute_s=statistics.median(rest), comm_s=statistics.median(comm), bubble_s=statistics.median(bubble))


def config_columns(point: Point) -> dict:
    cols = {"world": point.world or point.gpus, "nodes": point.nodes}
    keys = list(CONFIG_COLUMNS) + [k for k in point.settings if k not in PSEUDO_AXES and k not in CONFIG_COLUMNS]
    for key in keys:
        if point.cfg is not None:
            section, name = key.split(".", 1)
            cols[key] = getattr(getattr(point.cfg, section), name, None)
        else:
            cols[key] = point.settings.get(key)
    return cols


def predicted(point: Point, hw) -> dict:
    if hw is None or point.error:
        return {}
    from runtime.plan import plan_job

    p = plan_job(point.cfg, point.world, hw)
    return dict(pred_hardware=hw.name, pred_step_time_s=p.step_s, pred_compute_s=p.compute_s, pred_comm_s=p.comm_s,
                pred_bubble_s=p.bubble_s, pred_tokens_per_s=p.tokens_per_s, pred_peak_mem_gib=p.peak_gib,
                pred_anchor_s=reference_anchor_ms(hw, point.world // max(1, getattr(point, "nodes", 1))) / 1e3)


def reference_anchor_ms(hw, ranks_per_node: int) -> float:
    """The profile's host-speed anchor measured with as many ranks on a node as the point has (calibrate's one-
    and two-rank probes); NaN where it has none (GPU profiles, other counts)."""
    anchor = {1: hw.anchor_ms, 2: hw.shared_anchor_ms}.get(ranks_per_node, 0.0)
    return anchor if anchor > 0 else math.nan


def run_point(point: Point, grid: Grid, out: Path, launcher: str, address: str | None, gpus_per_worker: float,
              timeout_s: float) -> dict:
    """Run one resolved point; its row (never raises for a failed job)."""
    row = dict(id=point.id, index=point.index, launcher=launcher, settings=json.dumps(point.settings, default=str),
               started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    if point.error:
        return {**row, "status": "failed", "exit_code": 2, "cause": point.error, "wall_s": 0.0}
    cmds = command(point, grid, out, launcher, address, gpus_per_worker)
    row["command"] = shlex.join(cmds[0])
    log = out / "logs" / point.id
    code, stdout, stderr, wall = _run_process(cmds[0], log, timeout_s)
    row.update(wall_s=wall, log=str(log.with_suffix(".err")))
    if code is None:
        return {**row, "status": "timeout", "exit_code": -1,
                "cause": f"no result within {timeout_s:g} s (--timeout); last line: {_cause(stderr)}"}
    if code != 0:
        cause = _cause(stderr)
        return {**row, "status": classify(code, cause), "exit_code": code, "cause": cause}
    try:
        return {**row, "status": "ok", "exit_code": 0, "cause": "",
                **measured(out / "points" / point.id, grid.warmup_steps, stdout)}
    except (OSError, KeyError, ValueError) as e:
        return {**row, "status": "failed", "exit_code": 0, "cause": f"no metrics: {type(e).__name__}: {e}"}


# -- the table ------------------------------------------------------------------------------------------------
def read_rows(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(path).to_pylist() if path.exists() else []


def write_rows(path: Path, rows: list[dict]) -> None:
    """All rows → Parquet, atomically; a column whose values mix types is stored as text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    names = list(dict.fromkeys(k for r in rows for k in r))
    columns = {}
    for name in names:
        values = [r.get(name) for r in rows]
        kinds = {type(v) for v in values if v is not None}
        if kinds == {int, float}:
            values = [None if v is None else float(v) for v in values]
        elif len(kinds) > 1:
            values = [None if v is None else str(v) for v in values]
        columns[name] = values
    tmp = path.with_suffix(".parquet.tmp")
    pq.write_table(pa.table({k: pa.array(v) for k, v in columns.items()}), tmp)
    tmp.replace(path)


def _summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']}: {row['cause']}"
    mem = row.get("peak_mem_gib", math.nan)
    return (f"ok, {row['tokens_per_s']:,.0f} tokens/s ({row['tokens_per_s'] / row['world']:,.0f}/GPU), "
            f"step {1e3 * row['step_time_s']:.1f} ms, peak {mem:.2f} GiB, {row['wall_s']:.0f} s")


def run_sweep(grid_path: str, out: str | None = None, launcher: str | None = None, address: str | None = None,
              timeout_s: float | None = None, gpu: str | None = None, retry_failed: bool = False,
              dry_run: bool = False, gpus_per_worker: float | None = None, echo=print) -> list[dict]:
    """Run every point of the grid that has no row yet; returns all rows of DIR/sweep.parquet."""
    grid = load_grid(grid_path)
    launcher = launcher or grid.launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(f"--launcher {launcher!r} is unknown; use one of {list(LAUNCHERS)}")
    out_dir = Path(out or Path("runs") / "sweeps" / grid.path.stem).resolve()
    timeout_s = timeout_s or grid.timeout_s
    if timeout_s < 0:
        raise ConfigError(f"the point timeout {timeout_s:g} s is negative; pass --timeout SECONDS > 0 (or set the "
                          "grid's [sweep] timeout_s)")
    machine = device_info()
    if gpus_per_worker is None:
        gpus_per_worker = grid.gpus_per_worker if grid.gpus_per_worker is not None else (
            1.0 if machine["gpus_here"] else 0.0)
    hw = hardware_for(gpu, machine["device"])
    points = [resolve(p, grid, launcher) for p in expand(grid)]
    table = out_dir / "sweep.parquet"
    rows = read_rows(table)
    if retry_failed:
        rows = [r for r in rows if r["status"] == "ok"]
    done = {r["id"] for r in rows}
    todo = [p for p in points if p.id not in done]
    echo(f"longtrain: sweep {grid.path.name}: {len(points)} points, {len(points) - len(todo)} done before, "
         f"{len(todo)} to run with {launcher} → {table}")
    if dry_run:
        for p in todo:
            what = p.error or " && ".join(shlex.join(c) for c in command(p, grid, out_dir, launcher, address,
                                                                          gpus_per_worker))
            echo(f"  [{p.index}] {p.id} {json.dumps(p.settings, default=str)}: {what}")
        return rows
    if not todo:
        return rows
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(grid.path, out_dir / "grid.toml")
    common = dict(device=machine["device"], device_mem_gib=machine["device_mem_gib"], versions=versions(),
                  grid=grid.path.name, warmup_steps=grid.warmup_steps)
    for n, point in enumerate(todo, 1):
        label = " ".join(f"{k}={v}" for k, v in point.settings.items())
        if launcher == "torchrun" and point.nodes > 1 and not point.error:
            echo(f"longtrain: sweep [{n}/{len(todo)}] {point.id} {label}: {point.nodes} nodes — run on every node "
                 f"(not recorded; then run the sweep again elsewhere or launch with ray):")
            for cmd in command(point, grid, out_dir, launcher, address, gpus_per_worker):
                echo("  " + shlex.join(cmd))
            continue
        echo(f"longtrain: sweep [{n}/{len(todo)}] {point.id} {label} (gpus={point.world or point.gpus}) …")
        row = {**common, **config_columns(point), **run_point(point, grid, out_dir, launcher, address,
                                                               gpus_per_worker, timeout_s)}
        if row["status"] == "ok":
            row["tokens_per_s_per_gpu"] = row["tokens_per_s"] / row["world"]
        row.update(predicted(point, hw))
        row["config"] = json.dumps(point.overrides if point.error else point.cfg.to_dict(), default=str)
        rows.append(row)
        write_rows(table, rows)
        echo(f"longtrain: sweep [{n}/{len(todo)}] {point.id} → {_summary(row)}")
    ok = sum(r["status"] == "ok" for r in rows)
    echo(f"longtrain: sweep done: {ok} ok, {len(rows) - ok} not ok of {len(rows)} rows in {table}")
    return rows


def add_sweep_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("grid", help="grid file (TOML: [sweep], [base], [axes], [[zip]]; see configs/sweeps/)")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<grid name>)")
    parser.add_argument("--launcher", choices=LAUNCHERS, default=None,
                        help="local processes (default), torchrun (one node runs; several print their commands) "
                             "or ray (one Ray Train job per point)")
    parser.add_argument("--address", default=None, help="ray: the cluster (auto, ray://HOST:PORT); torchrun: "
                                                        "the rendezvous HOST:PORT of several nodes")
    parser.add_argument("--timeout", type=float, default=None, help="seconds per point (default: the grid's)")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="ray: GPUs per worker (default 1 where this machine has GPUs, else 0)")
    parser.add_argument("--gpu", default=None,
                        help="hardware profile for the predicted columns (h200, h100, a100 or a calibrate "
                             "file; default: the detected GPU's, none on CPU)")
    parser.add_argument("--retry-failed", action="store_true", help="run points again whose row is not ok")
    parser.add_argument("--dry-run", action="store_true", help="print each point's command; run nothing")
