"""The grid file of `longtrain sweep` and the points it expands to (see launch/sweep.py for the format).

`load_grid` reads and checks a grid TOML; `expand` turns its axes and zip groups into points; `resolve`
loads and validates each point's configuration and gives it an id that hashes what decides its measurement.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

from runtime.config import JobConfig, load_config, read_toml
from runtime.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("local", "torchrun", "ray")
PSEUDO_AXES = ("gpus", "nodes")  # not config keys: the ranks of a point and the nodes they span
# config columns every row carries (beside the grid's own axes)
CONFIG_COLUMNS = ("model.preset", "model.layout", "model.gate", "parallel.dp", "parallel.pp", "parallel.sp",
                  "parallel.microbatches", "parallel.remat", "parallel.layout", "parallel.sp_attention",
                  "train.seq_len", "train.batch_size", "train.window", "train.loss_chunk", "train.dtype")
DEFAULTS = ["train.eval_batches=0", "run.progress=false", "run.tensorboard=false"]  # the base may change these


@dataclass
class Grid:
    path: Path
    config: str | None
    base: dict[str, object]
    axes: list[list[dict[str, object]]]  # per axis: its settings, one dict per value
    warmup_steps: int = 1
    steps: int = 3
    timeout_s: float = 1800.0
    launcher: str = "local"
    gpus_per_worker: float | None = None


@dataclass
class Point:
    index: int
    settings: dict[str, object]  # the grid's varying settings of this point (display and columns)
    overrides: list[str]  # every section.key=value of the job, run.* excepted
    gpus: int | None
    nodes: int
    id: str = ""
    cfg: JobConfig | None = None  # loaded (also when it does not validate: its columns)
    world: int = 0
    error: str = ""  # the one-line reason the configuration does not validate
    command: list[str] = field(default_factory=list)


def _flatten(table: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in table.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _value_text(value) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def load_grid(path: str | Path) -> Grid:
    """Read and check a grid file (one line naming the problem otherwise)."""
    path = Path(path)
    raw = read_toml(path, "grid file", "configs/sweeps/tiny-cpu.toml")
    unknown = set(raw) - {"sweep", "base", "axes", "zip"}
    if unknown:
        raise ConfigError(f"grid file {str(path)!r}: unknown table(s) {sorted(unknown)}; use [sweep], [base], "
                          f"[axes] and [[zip]]")
    head = raw.get("sweep", {})
    known = {"config", "warmup_steps", "steps", "timeout_s", "launcher", "gpus_per_worker", "name"}
    if set(head) - known:
        raise ConfigError(f"[sweep] keys {sorted(set(head) - known)} are unknown; use {sorted(known)}")
    config = head.get("config")
    if config is not None:
        for candidate in (Path(config), path.parent / config):
            if candidate.is_file():
                config = str(candidate.resolve())
                break
        else:
            raise ConfigError(f"[sweep] config {config!r} exists neither from here nor beside {str(path)!r}")
    axes = []
    for key, values in _flatten(raw.get("axes", {})).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"axis {key!r} must be a non-empty list, e.g. {key} = [1, 2]")
        axes.append([{key: v} for v in values])
    zips = raw.get("zip", [])
    for group in zips if isinstance(zips, list) else [zips]:
        columns = _flatten(group)
        lengths = {len(v) if isinstance(v, list) else -1 for v in columns.values()}
        if len(lengths) != 1 or -1 in lengths or 0 in lengths:
            raise ConfigError(f"a [[zip]] group holds lists of one length; got {sorted(columns)} with lengths "
                              f"{[len(v) if isinstance(v, list) else 'not a list' for v in columns.values()]}")
        n = lengths.pop()
        axes.append([{k: v[i] for k, v in columns.items()} for i in range(n)])
    grid = Grid(path=path.resolve(), config=config, base=_flatten(raw.get("base", {})), axes=axes,
                warmup_steps=int(head.get("warmup_steps", 1)), steps=int(head.get("steps", 3)),
                timeout_s=float(head.get("timeout_s", 1800.0)), launcher=str(head.get("launcher", "local")),
                gpus_per_worker=head.get("gpus_per_worker"))
    if grid.warmup_steps < 0 or grid.steps < 1:
        raise ConfigError(f"[sweep] warmup_steps={grid.warmup_steps} must be ≥ 0 and steps={grid.steps} ≥ 1")
    if grid.launcher not in LAUNCHERS:
        raise ConfigError(f"[sweep] launcher={grid.launcher!r} is unknown; use one of {list(LAUNCHERS)}")
    return grid


def expand(grid: Grid) -> list[Point]:
    """The grid's points in order: the cartesian product of the axes (a [[zip]] group is one axis)."""
    points = []
    for i, combo in enumerate(itertools.product(*grid.axes)):
        settings: dict[str, object] = {}
        for part in combo:
            settings.update(part)
        values = {**grid.base, **settings}
        gpus = values.pop("gpus", None)
        nodes = int(values.pop("nodes", 1))
        overrides = DEFAULTS + [f"{k}={_value_text(v)}" for k, v in values.items()]
        points.append(Point(index=i, settings=settings, overrides=overrides, gpus=None if gpus is None else int(gpus),
                            nodes=nodes))
    return points


def _identity(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:12]


def resolve(point: Point, grid: Grid, launcher: str) -> Point:
    """Load and validate the point's configuration; its id hashes what decides the measurement."""
    from runtime.mesh import resolve_dims

    steps = [f"train.steps={grid.warmup_steps + grid.steps}"]
    try:
        cfg = point.cfg = load_config(grid.config, point.overrides + steps)  # kept for the columns if invalid
        world = point.gpus if point.gpus is not None else cfg.world_size()
        if point.nodes < 1 or world % point.nodes:
            raise ConfigError(f"nodes={point.nodes} must be ≥ 1 and divide gpus={world}")
        dp, pp, sp = resolve_dims(world, cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.sp)
        cfg.parallel.dp = dp
        cfg.validate(world)
    except ConfigError as e:
        point.error = str(e)
        point.id = _identity({"overrides": sorted(point.overrides + steps), "gpus": point.gpus,
                              "nodes": point.nodes, "launcher": launcher, "config": grid.config})
        return point
    job = cfg.to_dict()
    job.pop("run")
    point.world = world
    point.id = _identity({"job": job, "world": world, "nodes": point.nodes, "launcher": launcher})
    return point
