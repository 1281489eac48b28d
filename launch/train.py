"""Training entry point: `longtrain train ...` and `torchrun --nproc-per-node N -m launch.train ...`.

Under torchrun (WORLD_SIZE in the environment) every process runs the job directly; the
`longtrain train --nproc N` path validates first, then spawns N local processes.
"""

from __future__ import annotations

import argparse
import os
import sys

from runtime.checkpoint import check_resume
from runtime.config import JobConfig, load_config


def add_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="TOML file (e.g. configs/125m.toml); default: the built-in tiny job")
    parser.add_argument("--nproc", type=int, default=None,
                        help="local processes to spawn (default: dp·pp·sp of the config, or WORLD_SIZE under torchrun)")
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest committed checkpoint of run.dir (auto) or from PATH")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE",
                        help="override config keys, e.g. --set train.steps=100 parallel.sp=4")


def run_job(cfg: JobConfig) -> None:
    from runtime.trainer import train

    train(cfg)


def main_args(args: argparse.Namespace) -> None:
    cfg = load_config(args.config, args.overrides)
    if args.resume is not None:
        cfg.run.resume = args.resume
    under_torchrun = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    if under_torchrun:
        cfg.validate(int(os.environ["WORLD_SIZE"]))
        check_resume(cfg.run.resume, cfg.run.dir, cfg.to_dict())
        run_job(cfg)
        return
    nproc = args.nproc if args.nproc is not None else cfg.world_size()
    if nproc < 1:
        from runtime.errors import ConfigError

        raise ConfigError(f"--nproc {nproc} must be ≥ 1")
    cfg.validate(nproc)
    check_resume(cfg.run.resume, cfg.run.dir, cfg.to_dict())
    if nproc == 1:
        run_job(cfg)
    else:
        from launch.local import spawn

        spawn(run_job, nproc, cfg)


def main(argv: list[str] | None = None) -> int:
    from launch.cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
