"""`longtrain` command line: one subcommand per job; bad input ends in one line on stderr, exit 2."""

from __future__ import annotations

import argparse
import os
import sys

from runtime.errors import ConfigError

TRUST_HELP = ("accept an old-format checkpoint whose RNG states are Python pickles (they can run code: "
              "only for checkpoints you wrote yourself)")


def cmd_presets(args: argparse.Namespace) -> None:
    """Print every model preset with its parameter count and its model state per GPU at `--world` GPUs."""
    import torch

    from models import PRESETS, LinearLlama, num_parameters, preset
    from runtime.memory import state_bytes

    if args.world < 1 or args.pp < 1 or args.world % args.pp:
        raise ConfigError(f"--world {args.world} must be a positive multiple of --pp {args.pp}")
    replicas = args.world // args.pp
    print(f"model state per GPU (fp32 weights, gradients, AdamW moments; one micro-batch) at world {args.world} = "
          f"pp {args.pp} × dp·sp {replicas}, by parallel.shard: none | optimizer | full")
    width = max(map(len, PRESETS))
    for name in PRESETS:
        cfg = preset(name)
        with torch.device("meta"):
            model = LinearLlama(cfg)
        n = num_parameters(model)
        block = max(num_parameters(b) for b in model.layers.values())
        root = cfg.vocab_size * cfg.dim
        stage = n // args.pp + (root if args.pp > 1 else 0)
        gib = [state_bytes(stage, replicas, shard, block, root) / 2**30 for shard in ("none", "optimizer", "full")]
        print(f"{name:>{width}}  {n / 1e6:9.2f}M params  dim={cfg.dim} layers={cfg.n_layers} heads={cfg.n_heads} "
              f"layout={cfg.layout} vocab={cfg.vocab_size}  state/GPU {gib[0]:.1f} | {gib[1]:.1f} | {gib[2]:.1f} GiB")


def cmd_prepare_data(args: argparse.Namespace) -> None:
    """Parquet/Arrow text → zarr token store."""
    from tqdm import tqdm

    from runtime.data import prepare_data

    with tqdm(unit="B", unit_scale=True, desc="prepare-data", disable=not sys.stderr.isatty()) as bar:
        seen = [0]

        def progress(total_bytes: int) -> None:
            bar.update(total_bytes - seen[0])
            seen[0] = total_bytes

        info = prepare_data(args.input, args.output, args.seq_len, text_column=args.text_column,
                            tokenizer=args.tokenizer, chunk_len=args.chunk_len, overwrite=args.overwrite,
                            progress=progress)
    mb_s = info["text_bytes"] / max(info["seconds"], 1e-9) / 1e6
    print(f"longtrain: {info['documents']:,} documents, {info['tokens']:,} tokens → {info['sequences']:,} sequences "
          f"of {info['seq_len']} ({info['dropped_tokens']:,} tail tokens dropped), vocab {info['vocab_size']}, "
          f"{mb_s:.1f} MB/s → {args.output}")


def cmd_export(args: argparse.Namespace) -> None:
    """Checkpoint → consolidated safetensors."""
    from runtime.checkpoint import export_safetensors

    n = export_safetensors(args.checkpoint, args.output, trust=args.trust_checkpoint)
    print(f"longtrain: wrote {n} tensors to {args.output}")


def cmd_verify(args: argparse.Namespace) -> None:
    """A checkpoint or token store, read in full and checked; no model is loaded."""
    from runtime.checkpoint import verify_path

    _, checked = verify_path(args.path, trust=args.trust_checkpoint)
    note = "; old format, no digests to check" if checked.legacy else ""
    print(f"longtrain: {args.path} ok ({checked.arrays} arrays, {checked.nbytes / 2**20:.1f} MiB verified{note})")


def cmd_ray(args: argparse.Namespace) -> None:
    from launch.ray_train import run_ray

    last = run_ray(args)
    print(f"longtrain: Ray job finished at step {last.get('step')}, loss {last.get('loss', float('nan')):.4f}")


def cmd_sweep(args: argparse.Namespace) -> None:
    """A grid of jobs, one process each → DIR/sweep.parquet."""
    from launch.sweep import run_sweep

    run_sweep(args.grid, out=args.out, launcher=args.launcher, address=args.address, timeout_s=args.timeout,
              gpu=args.gpu, retry_failed=args.retry_failed, dry_run=args.dry_run,
              gpus_per_worker=args.gpus_per_worker, echo=lambda line: print(line, flush=True))


def cmd_report(args: argparse.Namespace) -> None:
    """PNG plots and report.md of a sweep folder."""
    from launch.report import write_report

    paths = write_report(args.dir, args.out, args.replan)
    print(f"longtrain: wrote {', '.join(str(p) for p in paths)}")


def cmd_plan(args: argparse.Namespace) -> None:
    """Predicted memory and step time of a job before launch (DESIGN §11)."""
    from runtime import plan
    from runtime.config import load_config

    if args.gpus < 1:
        raise ConfigError(f"--gpus {args.gpus} must be ≥ 1")
    hw = plan.load_hardware(args.gpu, None if args.inter_node_gbit is None else args.inter_node_gbit / 8,
                            args.gpus_per_node)
    cfg = load_config(args.config, args.overrides)
    if args.search:
        best, tried = plan.search(cfg, args.gpus, hw, top=args.top)
        print(plan.describe_search(best, tried, args.gpus, hw))
    else:
        if args.shard:
            cfg.parallel.shard = args.shard
        cfg.validate(args.gpus, cuda=True)
        print(plan.describe(plan.plan_job(cfg, args.gpus, hw)))
    if args.scaling:
        print(plan.describe_scaling(plan.scaling_table(cfg, hw, [8 << k for k in range(8)]), cfg, hw))


def cmd_calibrate(args: argparse.Namespace) -> None:
    """Measure the cost model's constants on this machine into a TOML file for `plan --gpu FILE`."""
    from pathlib import Path

    from launch.calibrate import calibrate, to_toml

    folder = Path(args.out).resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):  # before minutes of measuring, not after
        raise ConfigError(f"--out {args.out}: cannot write into {folder}; create the folder or pick another path")
    if Path(args.out).exists() and not args.overwrite:  # an earlier calibration is kept unless asked
        raise ConfigError(f"--out {args.out} exists (an earlier calibration?); pass --overwrite to replace it or "
                          f"pick another path")
    hw = calibrate(args.name, args.base, args.inter_node_gbit, args.quick)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    tmp.write_text(to_toml(hw))
    tmp.replace(args.out)  # whole or not at all
    host = (f", host {hw.layer_overhead_ms:.3g} ms per layer + {hw.chunk_overhead_ms:.3g} ms per recurrent chunk + "
            f"{hw.step_overhead_ms:.3g} ms per step (at a speed anchor of {hw.anchor_ms:.3g} ms), process "
            f"{hw.process_gib:.2f} GiB, × {hw.shared_host_factor:.3g} with ranks sharing the cores "
            f"(+ {hw.peer_wait_factor:.3g} × the per-layer host time waiting in collectives)"
            if hw.layer_overhead_ms or hw.step_overhead_ms or hw.process_gib else "")
    print(f"longtrain: {hw.name}: GEMM {hw.gemm_tflops:.3g} TFLOP/s, attention {hw.attention_tflops:.3g} TFLOP/s, "
          f"linear attention {hw.la_tokens_per_s / 1e6:.3g}M tokens/s (fwd+bwd, H·K·V 16·128·128), copy "
          f"{hw.copy_gbps:.3g} GB/s, collectives {hw.intra_node_gbps:.3g} GB/s + {hw.latency_us:.0f} µs{host} "
          f"→ {args.out}")


def build_parser() -> argparse.ArgumentParser:
    from launch.train import add_train_args, main_args

    parser = argparse.ArgumentParser(prog="longtrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a model (default: tiny preset, 4 local CPU processes, pp=2 × sp=2)")
    add_train_args(train)
    train.set_defaults(func=main_args)
    presets = sub.add_parser("presets", help="list the model presets and their model state per GPU")
    presets.add_argument("--world", type=int, default=8, help="GPUs of the job (default 8)")
    presets.add_argument("--pp", type=int, default=1, help="pipeline stages (default 1): dp·sp = world / pp")
    presets.set_defaults(func=cmd_presets)
    ray_cmd = sub.add_parser("ray", help="train on a Ray cluster (Ray Train TorchTrainer, fault tolerant)")
    from launch.ray_train import add_ray_args

    add_ray_args(ray_cmd)
    ray_cmd.set_defaults(func=cmd_ray)
    prep = sub.add_parser("prepare-data", help="tokenize Parquet/Arrow text into a zarr token store")
    prep.add_argument("--input", required=True, help="a Parquet/Arrow file or a folder of them")
    prep.add_argument("--text-column", default="text")
    prep.add_argument("--tokenizer", default="byte", help="byte (built in) or a Hugging Face tokenizer.json")
    prep.add_argument("--seq-len", type=int, required=True, help="tokens per stored sequence (= train.seq_len)")
    prep.add_argument("--chunk-len", type=int, default=None,
                      help="tokens per zarr chunk (default 65536 if it divides seq_len, else seq_len); "
                           "= the sp shard length makes each rank read exactly its bytes")
    prep.add_argument("--output", required=True, help="the .zarr store to create")
    prep.add_argument("--overwrite", action="store_true",
                      help="replace an existing store (only once the new one is complete)")
    prep.set_defaults(func=cmd_prepare_data)
    export = sub.add_parser("export", help="write a checkpoint's consolidated weights as safetensors")
    export.add_argument("checkpoint", help="a committed checkpoint folder (<run.dir>/checkpoints/step_*)")
    export.add_argument("--output", required=True)
    export.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    export.set_defaults(func=cmd_export)
    verify = sub.add_parser("verify", help="check a checkpoint (marker, digests, config) or a token store "
                                           "(chunks, attributes) without loading a model")
    verify.add_argument("path", help="a checkpoint folder (<run.dir>/checkpoints/step_*) or a .zarr token store")
    verify.add_argument("--trust-checkpoint", action="store_true", help=TRUST_HELP)
    verify.set_defaults(func=cmd_verify)
    from launch.sweep import add_sweep_args

    sweep = sub.add_parser("sweep", help="run a grid of jobs (one process each) into DIR/sweep.parquet; resumable")
    add_sweep_args(sweep)
    sweep.set_defaults(func=cmd_sweep)
    report = sub.add_parser("report", help="plots (PNG) and a markdown summary of a sweep folder")
    report.add_argument("dir", help="the sweep folder (holding sweep.parquet)")
    report.add_argument("--out", default=None, help="where the PNGs and report.md go (default: the sweep folder)")
    report.add_argument("--replan", metavar="GPU", default=None,
                        help="predict with today's `longtrain plan` on GPU (h200, h100, a100 or a hardware file) "
                             "instead of the predictions the sweep recorded at launch")
    report.set_defaults(func=cmd_report)
    plan = sub.add_parser("plan", help="predict per-rank memory and step time of a job before launch")
    plan.add_argument("--config", help="TOML file; default: the built-in tiny job")
    plan.add_argument("--gpus", type=int, required=True, help="ranks of the job (dp·pp·sp)")
    plan.add_argument("--gpu", default="h200", help="h200, h100, a100 or a hardware file (`longtrain calibrate`)")
    plan.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="SECTION.KEY=VALUE")
    plan.add_argument("--shard", choices=("auto", "none", "optimizer", "full"),
                      help="parameter/gradient/optimizer sharding over dp × sp (default: the config's parallel.shard)")
    plan.add_argument("--search", action="store_true",
                      help="rank every (dp, pp, sp, M, remat, window, sp_attention, shard) that fits by predicted "
                           "tokens/s")
    plan.add_argument("--top", type=int, default=10, help="settings --search prints")
    plan.add_argument("--scaling", action="store_true",
                      help="how each term grows from 8 to 1024 GPUs (one sequence over sp = N)")
    plan.add_argument("--inter-node-gbit", type=float, default=None,
                      help="bandwidth between nodes per GPU in Gb/s (default: the hardware file's, 400)")
    plan.add_argument("--gpus-per-node", type=int, default=None, help="default: the hardware file's (8)")
    plan.set_defaults(func=cmd_plan)
    from launch.calibrate import add_calibrate_args

    calibrate = sub.add_parser("calibrate", help="measure GEMM, kernel, copy and collective rates into a TOML file")
    add_calibrate_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every error ends in one line on stderr (exit 2: fix the input, 1: the job failed)."""
    from launch.local import RankFailed, one_line

    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return 2
    except RankFailed as e:
        print(f"longtrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("longtrain: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 — the launcher's own failure, still one line
        if os.environ.get("LONGTRAIN_TRACEBACK"):
            raise
        print(f"longtrain: error: {one_line(e)}", file=sys.stderr)
        return 1
    return 0


def entry() -> None:
    """The `longtrain` console script: main(), then the exit that a finished in-process rank needs."""
    from launch.local import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
