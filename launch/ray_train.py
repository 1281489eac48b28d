"""`longtrain ray`: the same training function under Ray Train's TorchTrainer (DESIGN §6).

One Ray worker per rank; Ray creates the process group (gloo on CPU, nccl on GPU) and the
job's mesh is laid over it exactly as under torchrun, sp innermost. Workers are placed PACK
(fill a node before the next), and Ray Train numbers world ranks node by node (grouped by node
id; its local and node ranks go by IP), so the ranks of one sp group — consecutive world ranks —
share a node whenever a node holds a multiple of sp workers (tests/launch/test_ray_placement.py).
A worker that dies fails the group; with `--max-failures K` Ray restarts it up to K times and
each restart resumes from the newest committed zarr checkpoint in run.dir (which must be on
storage every node sees). Metrics reach Ray every `run.report_every` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path

from launch.train import add_run_args, job_config
from runtime.checkpoint import check_resume
from runtime.config import JobConfig
from runtime.errors import ConfigError
from runtime.rundir import prepare_run_dir

PASS_THROUGH_ENV = ("NCCL_", "TORCH_NCCL_", "NVSHMEM_", "CUDA_", "GLOO_", "TORCH_SYMM_MEM_", "LONGTRAIN_")


def add_ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file; default: the built-in tiny job")
    parser.add_argument("--num-workers", type=int, default=None, help="Ray workers = ranks (default: dp·pp·sp)")
    parser.add_argument("--gpus-per-worker", type=float, default=0.0, help="0: CPU workers with gloo")
    parser.add_argument("--address", default=None,
                        help="auto (an existing cluster) or ray://HOST:PORT; default: start a local Ray instance")
    parser.add_argument("--max-failures", type=int, default=2, help="worker-group restarts before the job fails")
    parser.add_argument("--storage", default=None, help="Ray's storage path (default: <run.dir>/ray)")
    add_run_args(parser, "continue an earlier run of run.dir (auto) or from PATH (restarts always resume)")


def _worker(config: dict) -> None:
    """Runs on every Ray worker: the same `train` as torchrun, resuming after a restart."""
    import ray.train
    import torch

    from launch.local import configure_threads
    from runtime.faults import failure_from_env
    from runtime.trainer import train

    cfg = JobConfig.from_dict(config["job"])
    configure_threads(int(config["workers_per_node"]))

    def report(row: dict) -> None:
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))})

    if torch.cuda.is_available():
        torch.cuda.set_device(ray.train.torch.get_device())
    if os.environ.get("LONGTRAIN_PLACEMENT_RECORD"):
        _record_placement(os.environ["LONGTRAIN_PLACEMENT_RECORD"])
    train(cfg, on_report=report, before_step=failure_from_env(cfg.run.dir))


def _record_placement(directory: str) -> None:
    """Debug record (tests of placement): this worker's Ray and torch ranks and its Ray node, as
    DIRECTORY/rank_<k>.json; written when LONGTRAIN_PLACEMENT_RECORD names the directory."""
    import ray
    import ray.train
    import torch.distributed as dist

    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    record = {"rank": rank, "torch_rank": dist.get_rank() if dist.is_initialized() else None,
              "local_rank": ctx.get_local_rank(), "node_rank": ctx.get_node_rank(),
              "node_id": ray.get_runtime_context().get_node_id()}
    Path(directory).mkdir(parents=True, exist_ok=True)
    (Path(directory) / f"rank_{rank}.json").write_text(json.dumps(record))


def run_ray(args: argparse.Namespace) -> dict:
    cfg = job_config(args)
    workers = args.num_workers if args.num_workers is not None else cfg.world_size()
    if workers < 1:
        raise ConfigError(f"--num-workers {workers} must be ≥ 1")
    if args.max_failures < 0:
        raise ConfigError(f"--max-failures {args.max_failures} must be ≥ 0")
    cfg.validate(workers, cuda=args.gpus_per_worker > 0)  # the workers' devices, not the driver's
    cfg.run.dir = str(Path(cfg.run.dir).resolve())
    prepare_run_dir(cfg.run.dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    cfg.run.overwrite = False
    cfg.run.resume = cfg.run.resume or "auto"  # a restarted worker group continues from the last checkpoint
    check_resume(cfg.run.resume, cfg.run.dir, cfg.to_dict(), trust=cfg.run.trust_checkpoint)
    use_gpu = args.gpus_per_worker > 0

    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    env = {k: v for k, v in os.environ.items() if k.startswith(PASS_THROUGH_ENV)}
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    if not ray.is_initialized():
        if args.address:
            ray.init(address=args.address, runtime_env={"env_vars": env}, log_to_driver=True)
        else:  # a local instance; logical CPUs so that every rank gets a worker on a small machine
            ray.init(num_cpus=max(workers + 1, os.cpu_count() or 1), runtime_env={"env_vars": env},
                     include_dashboard=False, log_to_driver=True)
    resources = {"CPU": 1}
    if use_gpu:
        resources["GPU"] = args.gpus_per_worker
    nodes = max(1, len([n for n in ray.nodes() if n.get("Alive")]))
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"job": cfg.to_dict(), "workers_per_node": -(-workers // nodes)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources,
                                     placement_strategy="PACK"),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=int(cfg.parallel.timeout_s)),
        run_config=RunConfig(name=Path(cfg.run.dir).name, storage_path=args.storage or str(Path(cfg.run.dir) / "ray"),
                             failure_config=FailureConfig(max_failures=args.max_failures)),
    )
    try:
        result = trainer.fit()
        error = getattr(result, "error", None)
    except Exception as e:  # Ray wraps the worker's error
        error = e
    if error is not None:
        ray.shutdown()  # stop the log stream first, so that the one-line error is the last word
        raise RayJobFailed(_root_cause(error), args.max_failures) from None
    return _last_metrics(cfg.run.dir)


def _last_metrics(run_dir: str) -> dict:
    import pyarrow.parquet as pq

    path = Path(run_dir) / "metrics.parquet"
    rows = pq.read_table(path).to_pylist() if path.exists() else []
    return rows[-1] if rows else {}


class RayJobFailed(RuntimeError):
    def __init__(self, cause: str, max_failures: int):
        super().__init__(f"the Ray job failed after {max_failures} restart(s): {cause}; "
                         f"raise --max-failures or fix the cause, then rerun (it resumes from the last checkpoint)")


def _root_cause(e: BaseException) -> str:
    """The innermost error's first sentence."""
    while e.__cause__ is not None:
        e = e.__cause__
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    first = re.split(r"(?<=\.)\s", lines[0])[0] if lines else ""
    return f"{type(e).__name__}: {first}"[:240]
