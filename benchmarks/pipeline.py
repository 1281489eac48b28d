"""GPipe step time vs the bubble-only bound (issue 3, DESIGN §5).

    torchrun --nproc-per-node 2 benchmarks/pipeline.py [--preset 400m --seq-len 4096 --batch 16]

For each M ∈ {1, 2, 4, 8, 16}: t_mb = the slowest stage's forward+backward time on one
micro-batch of B/M sequences, measured alone (no pipeline); ideal = (M + P − 1)·t_mb, i.e.
(M+P−1)/M × the stage time of the whole batch, where only the fill–drain bubble is lost;
measured = the median GPipe step (all forwards, then all backwards, with P2P between stages).
Efficiency = ideal / measured; goal at M = 8: ≥ 0.95 (within 5 % of the bound).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks._timing import fenced_ms  # noqa: E402
from models import token_loss_sum  # noqa: E402
from parallel.pipeline import GPipe  # noqa: E402
from runtime.config import load_config  # noqa: E402
from runtime.mesh import build_mesh  # noqa: E402
from runtime.parallelize import build_stage_model  # noqa: E402


def cuda_time(fn, iters: int, warmup: int = 2) -> float:
    """Median seconds of fn() over `iters` runs, all ranks in step (barrier before each)."""
    for _ in range(warmup):
        fn()
    cuda = torch.cuda.is_available()
    times = [fenced_ms(fn, cuda) / 1e3 for _ in range(iters)]
    return statistics.median(times)


def measure(args: argparse.Namespace, M: int, world: int) -> tuple[tuple, list]:
    """One row of the table: (M, seqs per micro-batch, t_mb, ideal, measured, ideal/measured, peak GiB)."""
    cfg = load_config(None, [f"model.preset={args.preset}", f"model.backend={args.backend}", "parallel.dp=1",
                             f"parallel.pp={world}", "parallel.sp=1", f"parallel.microbatches={M}",
                             f"train.batch_size={args.batch}", f"train.seq_len={args.seq_len}"])
    cfg.validate(world)
    mesh = build_mesh(1, world, 1)
    dev, P = mesh.device, world
    torch.manual_seed(0)
    model, ranges = build_stage_model(cfg, mesh)
    n_tok = float(args.batch * args.seq_len)

    pipe = GPipe(model, stage_index=mesh.coord("pp"), num_stages=P, group=mesh.group("pp"), device=dev,
                 microbatches=M, loss_fn=token_loss_sum)
    V, d, mb = cfg.model.vocab_size, cfg.model.dim, args.batch // M
    tokens = torch.randint(0, V, (args.batch, args.seq_len), device=dev)
    targets = torch.randint(0, V, (args.batch, args.seq_len), device=dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda")
    # one micro-batch through this stage alone
    x_mb = tokens[:mb] if pipe.is_first else torch.randn(mb, args.seq_len, d, device=dev, requires_grad=True)

    def stage_alone() -> None:
        with autocast:
            out = model(x_mb)
            loss = token_loss_sum(out, targets[:mb]) / n_tok if pipe.is_last else (out.float() * 1e-3).sum()
        loss.backward()

    def pipeline_step() -> None:
        with autocast:
            loss = pipe.step(tokens, targets, loss_divisor=n_tok)
        if pipe.is_last:
            assert torch.isfinite(loss), "the pipeline produced a non-finite loss"

    t_alone = torch.tensor(cuda_time(stage_alone, args.iters), device=dev)
    dist.all_reduce(t_alone, op=dist.ReduceOp.MAX)
    t_step = cuda_time(pipeline_step, args.iters)
    ideal = (M + P - 1) * float(t_alone)
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")
    return (M, mb, float(t_alone) * 1e3, ideal * 1e3, t_step * 1e3, ideal / t_step, peak), ranges


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="400m")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--microbatches", default="1,2,4,8,16")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--backend", default="auto", help="linear-attention kernels: auto | triton | torch")
    ap.add_argument("--out", default=None, help="also write the markdown table here")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", 1))
    rows, ranges = [], None
    for M in [int(m) for m in args.microbatches.split(",")]:
        row, ranges = measure(args, M, world)
        rows.append(row)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    P = world

    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
        lines = [f"GPipe, {P} stages on {P}× {name}, preset {args.preset}, {args.batch}×{args.seq_len} tokens/step, "
                 f"bf16 autocast, torch {torch.__version__}, layers per stage {ranges}", "",
                 "| M | seqs/micro-batch | stage time per micro-batch (ms) | ideal (M+P−1)·t_mb (ms) | "
                 "measured step (ms) | ideal / measured | peak mem (GiB) |",
                 "|---|---|---|---|---|---|---|"]
        lines += [f"| {M} | {mb} | {t:.2f} | {i:.2f} | {s:.2f} | {e:.3f} | {m:.1f} |" for M, mb, t, i, s, e, m in rows]
        text = "\n".join(lines)
        print(text)
        if args.out:
            with open(args.out, "w") as f:
                f.write(text + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
