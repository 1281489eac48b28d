"""Benchmark: Triton causal short convolution (kernels/conv) vs the model's cat + conv1d + SiLU path.

    python benchmarks/short_conv.py [--shapes 1x131072,1x1048576] [--dim 6144] [--width 4]
        [--bwd scratch|direct|both]

bf16 x and halo, fp32 weight [D, 1, w] (as ShortConv holds it). Per shape: forward (no grad), backward alone
(torch.autograd.grad on a kept graph: the backward kernel, the dW partial sum and the allocations) and
forward+backward (gradients of x, weight and halo through torch.autograd.grad) medians of
`triton.testing.do_bench`, the effective bandwidth against the bytes that must move (forward: x read,
y written; backward: x and dy read, dx written; forward+backward: both), and the peak memory of one
forward+backward above the inputs (torch.cuda.max_memory_allocated after a reset). --bwd picks the Triton
backward kernel(s) (ConvConfig.bwd_direct: the scratch kernel, the direct one, or one row each, labelled);
the forward is the same kernel in both rows. Before timing, each Triton row's output and gradients are checked
against the reference (an HTML comment after the shape's rows). Rows that run out of memory show "—".
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MISSING = "—"
MAX_ERR = 2e-2  # a Triton row whose check against the reference is worse is reported, not timed
GIB = 1 << 30


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(v) for v in item.lower().split("x")) for item in spec.split(",")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="1x131072,1x1048576", help="comma-separated BxT (default %(default)s)")
    p.add_argument("--dim", type=int, default=3 * 2048, help="channels D (default %(default)s: q, k, v of d=2048)")
    p.add_argument("--width", type=int, default=4, help="taps w (default %(default)s)")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms (default %(default)s)")
    p.add_argument("--bwd", choices=("scratch", "direct", "both"), default="both",
                   help="Triton backward kernel(s) to time (default %(default)s)")
    p.add_argument("--no-halo", action="store_true", help="no halo (a whole sequence; default: a halo, as a window)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="a kernels.conv ConvConfig field for the Triton rows (repeatable), e.g. fwd_warps=8")
    return p.parse_args(argv)


def reference_path(x, weight, halo):
    """ShortConv.forward before kernels/conv: concatenated copy, conv1d in x's dtype, SiLU."""
    from kernels.conv import short_conv_reference

    return short_conv_reference(x, weight, halo)


def triton_path(x, weight, halo):
    from kernels.conv import short_conv

    return short_conv(x, weight, halo, backend="triton")


def configure(pairs: list[str]) -> None:
    """Set ConvConfig tile fields (FIELD=VALUE, positive ints) for every Triton row; one-line exit on a bad one."""
    from kernels.conv import triton_conv

    fields = {f.name: f.type for f in dataclasses.fields(triton_conv.ConvConfig)}
    changes = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name == "bwd_direct":
            sys.exit("short_conv benchmark: --set bwd_direct: pick the backward kernel with --bwd scratch|direct|both")
        if name not in fields or not value:
            sys.exit(f"short_conv benchmark: --set {pair!r}: use FIELD=VALUE with FIELD one of {', '.join(fields)}")
        if not value.isdigit() or int(value) < 1:
            sys.exit(f"short_conv benchmark: --set {pair!r}: the value must be a positive integer")
        if name != "bwd_programs" and int(value) & (int(value) - 1):  # tiles and warps: Triton needs powers of 2
            sys.exit(f"short_conv benchmark: --set {pair!r}: tile sizes and warps must be powers of 2")
        changes[name] = int(value)
    triton_conv.CONFIG = dataclasses.replace(triton_conv.CONFIG, **changes)


@contextlib.contextmanager
def backward_kernel(name: str):
    """The Triton backward on the scratch or the direct kernel (ConvConfig.bwd_direct) while inside."""
    from kernels.conv import triton_conv

    saved = triton_conv.CONFIG
    triton_conv.CONFIG = dataclasses.replace(saved, bwd_direct=name == "direct")
    try:
        yield
    finally:
        triton_conv.CONFIG = saved


def _inputs(x, weight, halo) -> list[torch.Tensor]:
    """The tensors a gradient is taken of: x, weight and the halo where there is one."""
    return [x, weight] + ([] if halo is None else [halo])


def _measure(fn, x, weight, halo, dy, rep: int) -> tuple[float, float, float, float]:
    """(forward ms, backward ms, forward+backward ms, peak GiB of one forward+backward above the inputs)."""
    from triton.testing import do_bench

    def fwd():
        with torch.no_grad():
            fn(x, weight, halo)

    def fwd_bwd():
        torch.autograd.grad(fn(x, weight, halo), _inputs(x, weight, halo), dy)

    def bwd_ms() -> float:  # the graph of one forward, kept between the timed backwards, freed on return
        y = fn(x, weight, halo)
        return do_bench(lambda: torch.autograd.grad(y, _inputs(x, weight, halo), dy, retain_graph=True), rep=rep,
                        return_mode="median")

    t_f = do_bench(fwd, rep=rep, return_mode="median")
    t_b = bwd_ms()
    t_fb = do_bench(fwd_bwd, rep=rep, return_mode="median")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fwd_bwd()
    torch.cuda.synchronize()
    return t_f, t_b, t_fb, (torch.cuda.max_memory_allocated() - base) / GIB


def _check(x, weight, halo, dy) -> float:
    """Largest relative error of the Triton output and gradients against the fp32 reference."""
    def run(fn, x, weight, halo):
        x, weight, halo = (None if a is None else a.detach().clone().requires_grad_() for a in (x, weight, halo))
        y = fn(x, weight, halo)
        return [y, *torch.autograd.grad(y.float(), _inputs(x, weight, halo), dy.float())]

    ours = run(triton_path, x, weight, halo)
    ref = run(reference_path, x.float(), weight, None if halo is None else halo.float())
    return max(((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip(ours, ref))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("short_conv benchmark: needs a CUDA device")
    D, w = args.dim, args.width
    configure(args.set)
    print(f"# short conv, {torch.cuda.get_device_name()}, D={D}, w={w}, bf16 x, "
          f"{'no halo' if args.no_halo else 'bf16 halo'}, fp32 weight, torch {torch.__version__}"
          + (f", ConvConfig {' '.join(args.set)}" if args.set else ""))
    print("| B×T | path | fwd ms | bwd ms | fwd+bwd ms | fwd GB/s | bwd GB/s | fwd+bwd GB/s | "
          "peak GiB (fwd+bwd, above inputs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    kernels = ("scratch", "direct") if args.bwd == "both" else (args.bwd,)
    for B, T in parse_shapes(args.shapes):
        g = torch.Generator(device="cuda").manual_seed(0)
        x = torch.randn(B, T, D, device="cuda", generator=g).bfloat16().requires_grad_()
        weight = (torch.rand(D, 1, w, device="cuda", generator=g) - 0.5).requires_grad_()
        halo = torch.randn(B, w - 1, D, device="cuda", generator=g).bfloat16().requires_grad_()
        halo = None if args.no_halo else halo
        dy = torch.randn(B, T, D, device="cuda", generator=g).bfloat16()
        n = B * T * D * x.element_size()
        rows = [("reference (cat+conv1d+silu)", reference_path, contextlib.nullcontext)]
        rows += [(f"triton (bwd {k})", triton_path, lambda k=k: backward_kernel(k)) for k in kernels]
        errs = []
        for name, fn, ctx in rows:
            with ctx():
                err = _check(x[:, :4096], weight, halo, dy[:, :4096]) if fn is triton_path else 0.0
                if fn is triton_path:
                    errs.append(f"{name}: {err:.2e}")
                try:
                    if not err <= MAX_ERR:  # NaN too
                        cells = [f"check failed ({err:.1e})"] + [MISSING] * 6
                    else:
                        t_f, t_b, t_fb, peak = _measure(fn, x, weight, halo, dy, args.rep)
                        cells = [f"{t_f:.3f}", f"{t_b:.3f}", f"{t_fb:.3f}", f"{2 * n / t_f / 1e6:.0f}",
                                 f"{3 * n / t_b / 1e6:.0f}", f"{5 * n / t_fb / 1e6:.0f}", f"{peak:.2f}"]
                except torch.OutOfMemoryError:
                    cells = [MISSING] * 7
            torch.cuda.empty_cache()
            print(f"| {B}×{T} | {name} | " + " | ".join(cells) + " |")
        print(f"<!-- {B}×{T}: max rel. error vs fp32 reference on the first 4096 tokens: {'; '.join(errs)} -->")


if __name__ == "__main__":
    main()
