"""Training entry point: `longtrain train ...` and `torchrun --nproc-per-node N -m launch.train ...`.

Under torchrun (WORLD_SIZE in the environment) every process runs the job directly; the
`longtrain train --nproc N` path validates first, then spawns N local processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from launch.local import RankFailed, run_rank, spawn
from runtime.checkpoint import check_resume
from runtime.config import JobConfig, load_config
from runtime.errors import ConfigError
from runtime.memory import check_fits
from runtime.rundir import log_dir, prepare_run_dir


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (e.g. configs/125m.toml); default: the built-in tiny job")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local processes to spawn (default: dp·pp·sp of the config, or WORLD_SIZE under torchrun)")
    add_run_args(parser, "continue from the newest valid checkpoint of run.dir (auto) or from PATH")


def add_run_args(parser: argparse.ArgumentParser, resume_help: str) -> None:
    """The flags `train` and `ray` share: resume / overwrite / trust a checkpoint, and config overrides."""
    parser.add_argument("--resume", default=None, metavar="auto|PATH", help=resume_help)
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run.dir that holds a run (deletes its metrics, checkpoints, logs)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a legacy checkpoint whose RNG state is a pickle (only one you wrote yourself)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config keys, e.g. --set train.steps=100 parallel.sp=4")


def job_config(args: argparse.Namespace) -> JobConfig:
    """The configuration of `train` / `ray` from their flags (before validation)."""
    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg.run.resume = args.resume
    cfg.run.overwrite = cfg.run.overwrite or args.overwrite
    cfg.run.trust_checkpoint = cfg.run.trust_checkpoint or args.trust_checkpoint
    return cfg


def run_job(cfg: JobConfig) -> None:
    from runtime.faults import failure_from_env
    from runtime.trainer import train

    train(cfg, before_step=failure_from_env(cfg.run.dir))


def main_args(args: argparse.Namespace) -> None:
    cfg = job_config(args)
    under_torchrun = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    nproc = int(os.environ["WORLD_SIZE"]) if under_torchrun else (
        args.nproc if args.nproc is not None else cfg.world_size())
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc} must be ≥ 1")
    cfg.validate(nproc)
    check_fits(cfg, nproc)
    if not under_torchrun or int(os.environ.get("RANK", 0)) == 0:
        prepare_run_dir(cfg.run.dir, resume=cfg.run.resume, overwrite=cfg.run.overwrite)
    path = check_resume(cfg.run.resume, cfg.run.dir, cfg.to_dict(), trust=cfg.run.trust_checkpoint)
    if path is not None:  # verified here in full once; each rank then checks only the arrays it reads
        cfg.run.resume = str(path)
    cfg.run.overwrite = False  # done: the ranks see a clean folder
    logs = log_dir(cfg.run.dir)
    if under_torchrun:  # every process runs its rank; torchrun's agent watches them
        code = run_rank(run_job, (cfg,), int(os.environ["RANK"]), logs)
        if code:
            raise RankFailed(_rank_error(logs, int(os.environ["RANK"])), code)
        os._exit(0)  # see launch.local: a finished rank must not risk the gloo teardown abort
    if nproc == 1:
        code = run_rank(run_job, (cfg,), 0, logs)
        if code:
            raise RankFailed(_rank_error(logs, 0), code)
        return
    spawn(run_job, nproc, cfg, log_dir=logs, timeout_s=cfg.parallel.timeout_s)


def _rank_error(logs, rank: int) -> str:
    import json

    try:
        error = json.loads((logs / f"rank_{rank}.error").read_text())
        message = error["message"]
    except (OSError, ValueError, KeyError):
        return f"rank {rank} failed; see {logs}"
    if int(error.get("exit_code", 1)) == 2:  # a configuration error: its message is all there is to it
        return message
    return f"{message} (traceback: {logs}/rank_{rank}.log)"


def main(argv: list[str] | None = None) -> int:
    from launch.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    from launch.local import exit_process

    exit_process(main())
