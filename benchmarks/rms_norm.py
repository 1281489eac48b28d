"""Benchmark: Triton RMSNorm (kernels/norm) vs the model's F.rms_norm (torch's fused kernel).

    python benchmarks/rms_norm.py [--shapes 131072x2048,1x65536x16x128] [--dtype bf16] [--reps 20]

x in --dtype, an fp32 weight [D] (as RMSNorm holds it; the torch path casts it to x's dtype, as the model does),
eps = 1e-6. Per shape: forward (no grad) and forward+backward (gradients of x and weight through
torch.autograd.grad) medians over --reps runs after --warmup runs, each fenced by CUDA events
(benchmarks/_timing.fenced_ms), and the effective bandwidth against the bytes that must move (forward: x read,
y written; forward+backward: that plus x and dy read, dx written). Before timing, both paths' output and gradients
are checked against the fp32 reference; the script stops if ours are off.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import fenced_ms  # noqa: E402
from kernels.norm import rms_norm, rms_norm_reference  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EPS = 1e-6
MAX_ERR = 1e-2


def parse_shapes(spec: str) -> list[tuple[int, ...]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="131072x2048,1x65536x16x128", help="comma-separated shapes, last dim D")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES), help="x's dtype (default %(default)s)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs first (default %(default)s)")
    p.add_argument("--reps", type=int, default=20, help="timed runs, median taken (default %(default)s, ≥ 10)")
    return p.parse_args(argv)


def torch_path(x, weight):
    """models.llama.RMSNorm.forward: torch's fused rms_norm with the weight cast to x's dtype."""
    return F.rms_norm(x, (x.shape[-1],), weight.to(x.dtype), EPS)


def triton_path(x, weight):
    return rms_norm(x, weight, EPS, backend="triton")


def _grads(fn, x, weight, dy) -> list[torch.Tensor]:
    xl, wl = x.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    y = fn(xl, wl)
    return [y, *torch.autograd.grad(y, [xl, wl], dy)]


def _max_err(fn, x, weight, dy) -> float:
    """Largest relative error of fn's y, dx and dw against the fp32 reference on the same inputs."""
    ours = _grads(fn, x, weight, dy)
    ref = _grads(lambda a, b: rms_norm_reference(a, b, EPS), x.float(), weight, dy.float())
    return max(((a.float() - b).norm() / b.norm()).item() for a, b in zip(ours, ref))


def _median_ms(fn, warmup: int, reps: int) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(fenced_ms(fn, cuda=True) for _ in range(reps))


def _measure(fn, x, weight, dy, warmup: int, reps: int) -> tuple[float, float]:
    """(forward ms, forward+backward ms)."""

    def fwd():
        with torch.no_grad():
            fn(x, weight)

    def fwd_bwd():
        torch.autograd.grad(fn(x, weight), [x, weight], dy)

    return _median_ms(fwd, warmup, reps), _median_ms(fwd_bwd, warmup, reps)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("rms_norm benchmark: needs a CUDA device (none is visible)", file=sys.stderr)
        sys.exit(2)
    if args.reps < 10:
        print(f"rms_norm benchmark: --reps must be ≥ 10; got {args.reps}", file=sys.stderr)
        sys.exit(2)
    dtype = DTYPES[args.dtype]
    print(
        f"# RMSNorm, {torch.cuda.get_device_name()}, fp32 weight, eps={EPS}, torch {torch.__version__}, "
        f"median of {args.reps} after {args.warmup} warm-up runs"
    )
    print(
        "| shape | dtype | torch fwd ms | torch fwd+bwd ms | torch fwd GB/s | torch fwd+bwd GB/s | ours fwd ms "
        "| ours fwd+bwd ms | ours fwd GB/s | ours fwd+bwd GB/s | speed-up fwd | speed-up fwd+bwd | max rel. err "
        "torch / ours |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for shape in parse_shapes(args.shapes):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(shape, device="cuda", generator=g).to(dtype).requires_grad_()
        weight = (torch.rand(shape[-1], device="cuda", generator=g) + 0.5).requires_grad_()
        dy = torch.randn(shape, device="cuda", generator=g).to(dtype)
        err_t, err_o = _max_err(torch_path, x, weight, dy), _max_err(triton_path, x, weight, dy)
        if not err_o <= MAX_ERR:
            sys.exit(f"rms_norm benchmark: ours is off at {shape}: relative error {err_o:.2e} > {MAX_ERR}")
        torch.cuda.empty_cache()
        n = x.numel() * x.element_size()
        t_f, t_fb = _measure(torch_path, x, weight, dy, args.warmup, args.reps)
        o_f, o_fb = _measure(triton_path, x, weight, dy, args.warmup, args.reps)
        cells = [
            f"{t_f:.3f}",
            f"{t_fb:.3f}",
            f"{2 * n / t_f / 1e6:.0f}",
            f"{5 * n / t_fb / 1e6:.0f}",
            f"{o_f:.3f}",
            f"{o_fb:.3f}",
            f"{2 * n / o_f / 1e6:.0f}",
            f"{5 * n / o_fb / 1e6:.0f}",
            f"{t_f / o_f:.2f}×",
            f"{t_fb / o_fb:.2f}×",
            f"{err_t:.1e} / {err_o:.1e}",
        ]
        print(f"| {'×'.join(map(str, shape))} | {args.dtype} | " + " | ".join(cells) + " |")
        del x, weight, dy
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
