"""`longtrain` command line: one subcommand per job; bad input ends in one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import sys

from runtime.errors import ConfigError


def cmd_presets(args: argparse.Namespace) -> None:
    """Print every model preset with its parameter count."""
    import torch

    from models import PRESETS, LinearLlama, num_parameters, preset

    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            n = num_parameters(LinearLlama(cfg))
        print(f"{name:>6}  {n / 1e6:9.2f}M params  dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
              f"layout={cfg.layout} vocab={cfg.vocab_size}")


def build_parser() -> argparse.ArgumentParser:
    from launch.train import add_train_args, main_args

    parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (default: tiny preset, 4 local CPU processes, pp=2 × sp=2)")
    add_train_args(train)
    train.set_defaults(func=main_args)
    sub.add_parser("presets", help="list the model presets").set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
