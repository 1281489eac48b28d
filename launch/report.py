"""`longtrain report DIR`: plots and a markdown summary of a sweep's DIR/sweep.parquet.

    scaling.png   tokens/s per GPU against GPUs: strong scaling (one problem, more GPUs) and weak scaling (the
                  same tokens per GPU), the ideal (flat) line and each point's efficiency against the fewest GPUs
    memory.png    peak memory per rank against sequence length, one line per configuration, the device's memory
                  and the points that ran out of it; predicted memory dashed where the sweep has a prediction
    throughput.png  tokens/s per GPU against sequence length, the same lines, predicted dashed
    mfu.png       MFU over (sp, pp), the best point of each cell (tokens/s per GPU where MFU is unknown: CPU)
    report.md     every point (status, cause, throughput, memory) and predicted beside measured (`--replan GPU`:
                  predicted by today's plan rather than the one the sweep recorded at launch)

Where several splits of one series share a GPU count, the fastest is plotted and labelled with its dp×pp×sp.
"""

from __future__ import annotations

import math
import types
from collections import defaultdict
from pathlib import Path

from runtime.errors import ConfigError

SPLIT_KEYS = ("parallel.dp", "parallel.pp", "parallel.sp", "parallel.microbatches", "world", "nodes")
MEMORY_GOAL, TIME_GOAL = 0.10, 0.15  # the model's stated accuracy against measured points


def load_rows(sweep_dir: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(sweep_dir) / "sweep.parquet"
    if not path.exists():
        raise ConfigError(f"{str(path)!r} does not exist; run `longtrain sweep GRID.toml --out {sweep_dir}` first")
    return pq.read_table(path).to_pylist()


def replan(rows: list[dict], gpu: str) -> int:
    """Recompute the predicted columns with the current `runtime.plan` on hardware `gpu` (a sweep records the
    plan of its own day): each ok row's job is rebuilt from its command's --config / --set; returns how many
    rows were re-predicted (rows whose command names no job keep what they hold)."""
    import shlex

    from launch.sweep import predicted
    from runtime.config import load_config
    from runtime.plan import load_hardware

    try:
        hw = load_hardware(gpu)
    except ConfigError as e:  # its message names plan's flag
        raise ConfigError(str(e).replace("--gpu", "--replan", 1)) from None
    done = 0
    for r in rows:
        args = shlex.split(r.get("command") or "")
        if r.get("status") != "ok" or "--set" not in args:
            continue
        config = args[args.index("--config") + 1] if "--config" in args else None
        overrides = [a for a in args[args.index("--set") + 1:] if "=" in a and not a.startswith("-")]
        try:  # a base config file of another machine's path: the row keeps its recorded prediction
            cfg = load_config(config, overrides)
        except (ConfigError, OSError):
            continue
        r.update(predicted(types.SimpleNamespace(cfg=cfg, world=r.get("world") or 1, nodes=r.get("nodes") or 1,
                                                 error=None), hw), replanned=True)
        done += 1
    return done


def _config_keys(rows: list[dict]) -> list[str]:
    return sorted({k for r in rows for k in r if k.startswith(("model.", "parallel.", "train."))})


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _label(key: tuple, names: list[str], varying: set[str]) -> str:
    shown = varying or {"model.preset", "train.seq_len", "tokens_per_gpu"}  # nothing varies: say what it is
    return ", ".join(f"{n.split('.', 1)[-1]}={v}" for n, v in zip(names, key) if n in shown)


def _varying(keys: list[tuple], names: list[str]) -> set[str]:
    return {n for i, n in enumerate(names) if len({k[i] for k in keys}) > 1}


def scaling_series(rows: list[dict]) -> dict[str, dict[str, list[dict]]]:
    """{"strong"|"weak": {label: [row per GPU count, the fastest split, by GPUs]}} over series with ≥ 2 GPU counts.

    Strong: every configuration column but the split equal (the same problem). Weak: equal but for the split,
    train.seq_len and train.batch_size, with the same tokens per GPU."""
    ok = [r for r in rows if r.get("status") == "ok" and _finite(r.get("tokens_per_s_per_gpu"))]
    keys = _config_keys(ok) + ["launcher"]
    strong_names = [k for k in keys if k not in SPLIT_KEYS]
    weak_names = [k for k in strong_names if k not in ("train.seq_len", "train.batch_size")] + ["tokens_per_gpu"]
    out = {}
    for kind, names in (("strong", strong_names), ("weak", weak_names)):
        groups: dict[tuple, dict[int, dict]] = defaultdict(dict)
        for r in ok:
            per_gpu = r["tokens_per_step"] / r["world"]
            values = {**r, "tokens_per_gpu": int(per_gpu) if per_gpu == int(per_gpu) else per_gpu}
            key = tuple(values.get(n) for n in names)
            best = groups[key].get(r["world"])
            if best is None or r["tokens_per_s_per_gpu"] > best["tokens_per_s_per_gpu"]:
                groups[key][r["world"]] = r
        series = {k: [v[w] for w in sorted(v)] for k, v in groups.items() if len(v) > 1}
        if kind == "weak":  # a weak series that is also a strong one (same problem at every size) is not weak
            series = {k: v for k, v in series.items() if len({r["tokens_per_step"] for r in v}) > 1}
        varying = _varying(list(series), names)
        out[kind] = {_label(k, names, varying): v for k, v in series.items()}
    return out


def _split(r: dict) -> str:
    return f"{r.get('parallel.dp')}×{r.get('parallel.pp')}×{r.get('parallel.sp')}"


def _log2_axis(ax, values: list[float]) -> None:
    ticks = sorted(set(values))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([f"{int(t):,}" if t < 1 << 20 else f"{t / (1 << 20):g}M" for t in ticks])
    ax.minorticks_off()


def figure_scaling(rows: list[dict]):
    from matplotlib.figure import Figure

    series = scaling_series(rows)
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    for ax, kind in zip(fig.subplots(1, 2), ("strong", "weak")):
        ax.set_title(f"{kind} scaling ({'same problem' if kind == 'strong' else 'same tokens per GPU'})")
        ax.set_xlabel("GPUs (ranks)")
        ax.set_ylabel("throughput per GPU (tokens/s/GPU)")
        if not series[kind]:
            ax.text(0.5, 0.5, f"no {kind}-scaling series\n(one GPU count per configuration)", ha="center",
                    va="center", transform=ax.transAxes)
            continue
        worlds = []
        for label, points in series[kind].items():
            x = [r["world"] for r in points]
            y = [r["tokens_per_s_per_gpu"] for r in points]
            worlds += x
            (line,) = ax.plot(x, y, marker="o", label=label)
            line.set_gid("measured")
            (ideal,) = ax.plot(x, [y[0]] * len(x), linestyle="--", color=line.get_color(), alpha=0.6)
            ideal.set_gid("ideal")
            for r, xi, yi in zip(points, x, y):
                ax.annotate(f"{yi / y[0]:.0%}\n{_split(r)}", (xi, yi), textcoords="offset points", xytext=(0, 6),
                            ha="center", fontsize=7)
        _log2_axis(ax, worlds)
        top = max(r["tokens_per_s_per_gpu"] for points in series[kind].values() for r in points)
        ax.set_ylim(0, 1.18 * top)  # room for the labels above the points
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="dashed: ideal (flat per GPU)", title_fontsize=7)
    return fig


def memory_series(rows: list[dict]) -> dict[str, list[dict]]:
    """{label: rows by sequence length} of every configuration (all columns but train.seq_len), OOM rows kept."""
    use = [r for r in rows if r.get("train.seq_len") is not None and (
        (r.get("status") == "ok" and _finite(r.get("peak_mem_gib"))) or r.get("status") == "oom")]
    names = [k for k in _config_keys(use) if k != "train.seq_len"] + ["world"]
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in use:
        groups[tuple(r.get(n) for n in names)].append(r)
    varying = _varying(list(groups), names)
    return {_label(k, names, varying): sorted(v, key=lambda r: r["train.seq_len"]) for k, v in groups.items()}


def figure_memory(rows: list[dict]):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    kinds = {r.get("mem_kind") for r in rows if r.get("status") == "ok"}
    what = "RSS of each process" if kinds == {"rss"} else "CUDA max allocated"
    ax.set_title(f"peak memory per rank ({what})")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("peak memory per rank (GiB)")
    device = [r["device_mem_gib"] for r in rows if _finite(r.get("device_mem_gib"))]
    lengths = []
    for label, points in memory_series(rows).items():
        ok = [r for r in points if r["status"] == "ok"]
        lengths += [r["train.seq_len"] for r in points]
        (line,) = ax.plot([r["train.seq_len"] for r in ok], [r["peak_mem_gib"] for r in ok], marker="o", label=label)
        line.set_gid("measured")
        pred = [r for r in points if _finite(r.get("pred_peak_mem_gib"))]
        if pred:
            (p,) = ax.plot([r["train.seq_len"] for r in pred], [r["pred_peak_mem_gib"] for r in pred], linestyle="--",
                           color=line.get_color(), alpha=0.7, marker="D", fillstyle="none")
            p.set_gid("predicted")
        oom = [r["train.seq_len"] for r in points if r["status"] == "oom"]
        if oom:
            ax.plot(oom, [device[0] if device else max((r["peak_mem_gib"] for r in ok), default=1.0)] * len(oom),
                    marker="x", linestyle="none", color=line.get_color(), markersize=10, gid="oom")
    if device:
        ax.axhline(device[0], color="black", linestyle=":", label=f"device memory {device[0]:.0f} GiB", gid="device")
    if lengths:
        _log2_axis(ax, lengths)
    else:
        ax.text(0.5, 0.5, "no point with a measured peak", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="dashed: predicted; x: out of memory", title_fontsize=7)
    return fig


def figure_throughput(rows: list[dict]):
    """Tokens/s per GPU against sequence length, one line per configuration (as the memory figure), the plan's
    prediction dashed: how throughput holds up as sequences grow, on any number of GPUs."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.set_title("throughput against sequence length")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("tokens/s per GPU")
    lengths = []
    for label, points in memory_series(rows).items():
        ok = [r for r in points if r["status"] == "ok" and _finite(r.get("tokens_per_s_per_gpu"))]
        lengths += [r["train.seq_len"] for r in ok]
        (line,) = ax.plot([r["train.seq_len"] for r in ok], [r["tokens_per_s_per_gpu"] for r in ok], marker="o",
                          label=label, gid="measured")
        pred = [r for r in ok if _finite(r.get("pred_tokens_per_s"))]
        if pred:
            ax.plot([r["train.seq_len"] for r in pred], [r["pred_tokens_per_s"] / (r.get("world") or 1) for r in pred],
                    linestyle="--", color=line.get_color(), alpha=0.7, marker="D", fillstyle="none", gid="predicted")
    if lengths:
        _log2_axis(ax, lengths)
        ax.legend(fontsize=7, title="dashed: predicted", title_fontsize=7)
    else:
        ax.text(0.5, 0.5, "no point with a measured throughput", ha="center", va="center", transform=ax.transAxes)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return fig


def mfu_grid(rows: list[dict]) -> tuple[str, list[int], list[int], list[list[float]]]:
    """(quantity, sp values, pp values, cells[pp][sp]): the best MFU of each (sp, pp), or tokens/s/GPU if no MFU."""
    ok = [r for r in rows if r.get("status") == "ok"]
    quantity = "mfu" if any(_finite(r.get("mfu")) for r in ok) else "tokens_per_s_per_gpu"
    sps = sorted({r["parallel.sp"] for r in ok})
    pps = sorted({r["parallel.pp"] for r in ok})
    cells = [[math.nan] * len(sps) for _ in pps]
    for r in ok:
        v = r.get(quantity)
        if _finite(v):
            i, j = pps.index(r["parallel.pp"]), sps.index(r["parallel.sp"])
            cells[i][j] = v if math.isnan(cells[i][j]) else max(cells[i][j], v)
    return quantity, sps, pps, cells


def figure_mfu(rows: list[dict]):
    import numpy as np
    from matplotlib.figure import Figure

    quantity, sps, pps, cells = mfu_grid(rows)
    fig = Figure(figsize=(6.5, 4.8), layout="constrained")
    ax = fig.subplots()
    data = np.array(cells, dtype=float) if cells else np.full((1, 1), np.nan)
    scale = 100.0 if quantity == "mfu" else 1.0
    image = ax.imshow(data * scale, origin="lower", cmap="viridis", aspect="auto")
    fig.colorbar(image, ax=ax, label="MFU (%)" if quantity == "mfu" else "tokens/s per GPU")
    ax.set_xticks(range(len(sps)), [str(s) for s in sps])
    ax.set_yticks(range(len(pps)), [str(p) for p in pps])
    ax.set_xlabel("sequence-parallel ranks sp")
    ax.set_ylabel("pipeline stages pp")
    title = "MFU over (sp, pp), best point per cell" if quantity == "mfu" else \
        "MFU unknown (no peak FLOP/s on CPU): tokens/s per GPU over (sp, pp), best per cell"
    ax.set_title(title, fontsize=9)
    low, high = image.get_clim()
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if math.isfinite(data[i, j]):
                text = f"{data[i, j] * scale:.1f}%" if quantity == "mfu" else f"{data[i, j]:,.0f}"
                bright = high > low and (data[i, j] * scale - low) / (high - low) > 0.6  # viridis: light at the top
                ax.text(j, i, text, ha="center", va="center", color="black" if bright else "white", fontsize=9)
    return fig


def _fmt(x, spec: str) -> str:
    return format(x, spec) if _finite(x) else "—"


def _err(pred, meas) -> float:
    return (pred - meas) / meas if _finite(pred) and _finite(meas) and meas else math.nan


def host_speed(r: dict) -> float:
    """How much slower the host ran beside the point's steps than while its profile was calibrated: the sweep's
    median anchor_s (run.speed_anchor) over the profile's anchor with as many ranks per node (pred_anchor_s:
    anchor_ms, or shared_anchor_ms for two); NaN where either was not measured (GPU profiles). A shared CPU's
    speed drifts by more than the time goal, so its predictions are compared at this speed too."""
    anchor, reference = r.get("anchor_s"), r.get("pred_anchor_s")
    return anchor / reference if _finite(anchor) and _finite(reference) and anchor > 0 and reference > 0 else math.nan


def _pred_cell(pred, meas, scale: str = "") -> str:
    return f"{_fmt(1e3 * pred, '.1f')} ({_fmt(100 * _err(pred, meas), '+.0f')} %){scale}" if _finite(pred) else "—"


def markdown(rows: list[dict], images: list[str], series: dict) -> str:
    lines = ["# Sweep report", ""]
    ok = sum(r.get("status") == "ok" for r in rows)
    first = rows[0] if rows else {}
    lines += [f"{len(rows)} points, {ok} ok. Device: {first.get('device', '?')}; {first.get('versions', '')}. "
              f"Timed steps follow {first.get('warmup_steps', '?')} warm-up step(s); step time is their median.", ""]
    lines += [f"![{Path(i).stem}]({i})" for i in images] + [""]
    lines += ["| id | status | settings | GPUs | dp×pp×sp | seq_len | tokens/s | tokens/s/GPU | MFU | step ms | "
              "peak GiB | predicted step ms (error) | at the host's speed (error) × speed | predicted GiB (error) | "
              "cause |",
              "|" + "---|" * 15]
    for r in sorted(rows, key=lambda r: r.get("index", 0)):
        mem_err = _err(r.get("pred_peak_mem_gib"), r.get("peak_mem_gib"))
        pred, meas, speed = r.get("pred_step_time_s"), r.get("step_time_s"), host_speed(r)
        pred_step = _pred_cell(pred, meas)
        at_speed = _pred_cell(pred * speed, meas, f" ×{speed:.2f}") if _finite(pred) and _finite(speed) else "—"
        pred_mem = (f"{_fmt(r['pred_peak_mem_gib'], '.2f')} ({_fmt(100 * mem_err, '+.0f')} %)"
                    if _finite(r.get("pred_peak_mem_gib")) else "—")
        cells = [r["id"], r["status"], f"`{r['settings']}`" if r.get("settings") else "—", r.get("world"), _split(r),
                 r.get("train.seq_len"), _fmt(r.get("tokens_per_s"), ",.0f"),
                 _fmt(r.get("tokens_per_s_per_gpu"), ",.0f"),
                 _fmt(100 * (r.get("mfu") or math.nan), ".1f"), _fmt(1e3 * (r.get("step_time_s") or math.nan), ".1f"),
                 _fmt(r.get("peak_mem_gib"), ".2f"), pred_step, at_speed, pred_mem,
                 (r.get("cause") or "").replace("|", "\\|")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    for kind, group in series.items():
        for label, points in group.items():
            base = points[0]["tokens_per_s_per_gpu"]
            cells = ", ".join(f"{r['world']} GPUs {r['tokens_per_s_per_gpu']:,.0f} "
                              f"({r['tokens_per_s_per_gpu'] / base:.0%})" for r in points)
            lines += ["", f"{kind} scaling, {label}: {cells}"]
    split = [r for r in sorted(rows, key=lambda r: r.get("index", 0))
             if r.get("status") == "ok" and _finite(r.get("comm_s"))]
    if split:
        lines += ["", "## Where the step went (ms, measured / predicted)", "",
                  "Measured: host time in blocking collectives (communication), in the pipeline's send / recv "
                  "(bubble: waiting for the other stages, and the transfer), and the rest (compute); medians over "
                  "the timed steps of rank 0. Only where collectives block the host (gloo on CPUs).", "",
                  "| id | dp×pp×sp | seq_len | compute | communication | bubble |", "|---|---|---|---|---|---|"]
        for r in split:
            cells = [r["id"], _split(r), r.get("train.seq_len")]
            cells += [f"{_fmt(1e3 * r[m], '.1f')} / {_fmt(1e3 * (r.get(p) or math.nan), '.1f')}"
                      for m, p in (("compute_s", "pred_compute_s"), ("comm_s", "pred_comm_s"),
                                   ("bubble_s", "pred_bubble_s"))]
            lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    pairs = [(_err(r.get("pred_peak_mem_gib"), r.get("peak_mem_gib")), _err(r.get("pred_step_time_s"),
              r.get("step_time_s"))) for r in rows if r.get("status") == "ok"]
    mem = [abs(m) for m, _ in pairs if _finite(m)]
    step = [abs(s) for _, s in pairs if _finite(s)]
    at_speed = [abs(_err(r.get("pred_step_time_s") * host_speed(r), r.get("step_time_s"))) for r in rows
                if r.get("status") == "ok" and _finite(r.get("pred_step_time_s")) and _finite(host_speed(r))]
    lines += ["", "## Predicted beside measured", ""]
    if any(r.get("replanned") for r in rows):
        lines += [f"Predictions recomputed with the current plan on `{first.get('pred_hardware', '?')}` "
                  "(`longtrain report --replan`), not those recorded at launch.", ""]
    if mem or step:
        within_mem, within_step = sum(e <= MEMORY_GOAL for e in mem), sum(e <= TIME_GOAL for e in step)
        lines.append(f"peak memory within {MEMORY_GOAL:.0%}: {within_mem} of {len(mem)} points; "
                     f"step time within {TIME_GOAL:.0%}: {within_step} of {len(step)} points.")
        if at_speed:
            lines.append(f"At the host's speed beside each point (its anchor_s over the profile's anchor for its ranks "
                         f"per node): step "
                         f"time within {TIME_GOAL:.0%}: {sum(e <= TIME_GOAL for e in at_speed)} of {len(at_speed)} "
                         f"points.")
    else:
        lines.append("no point has a prediction (run the sweep with --gpu NAME|FILE, or on a GPU with a shipped "
                     "profile).")
    return "\n".join(lines) + "\n"


def write_report(sweep_dir: str | Path, out: str | Path | None = None, replan_gpu: str | None = None) -> list[Path]:
    """The PNGs and report.md of a sweep folder; returns their paths. `replan_gpu`: predict with today's plan on
    that hardware instead of the predictions the sweep recorded."""
    rows = load_rows(sweep_dir)
    if replan_gpu:
        replan(rows, replan_gpu)
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, build in (("scaling", figure_scaling), ("memory", figure_memory), ("throughput", figure_throughput),
                        ("mfu", figure_mfu)):
        fig = build(rows)
        path = out / f"{name}.png"
        fig.savefig(path, dpi=150)
        written.append(path)
    md = out / "report.md"
    md.write_text(markdown(rows, [p.name for p in written], scaling_series(rows)))
    return [*written, md]
