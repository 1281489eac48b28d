"""Benchmark: Triton SwiGLU (kernels/swiglu) vs the model's former chunk + SiLU + multiply path.

    python benchmarks/swiglu.py [--tokens 131072,1048576] [--hidden 6144]

bf16 z = [g | u] [T, 2F] (the fused gate/up projection's output). Per size: forward (no grad) and
forward+backward (d z through torch.autograd.grad) medians of `triton.testing.do_bench`, and the effective
bandwidth against the bytes that must move (forward: z read, h written; forward+backward: that plus z and
dh read, dz written). Before timing, the Triton output and gradient are checked against the fp32 reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MISSING = "—"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", default="131072,1048576", help="comma-separated token counts (default %(default)s)")
    p.add_argument("--hidden", type=int, default=6144, help="SwiGLU width F (default %(default)s: the 1b preset)")
    p.add_argument("--rep", type=int, default=50, help="do_bench repetition time in ms (default %(default)s)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("swiglu benchmark: needs a CUDA device")
    from triton.testing import do_bench

    from kernels.swiglu import swiglu, swiglu_reference

    F = args.hidden
    print(f"# SwiGLU, {torch.cuda.get_device_name()}, F={F}, bf16, torch {torch.__version__}")
    print("| tokens | path | fwd ms | fwd+bwd ms | fwd GB/s | fwd+bwd GB/s |")
    print("|---|---|---|---|---|---|")
    for T in (int(t) for t in args.tokens.split(",")):
        g = torch.Generator(device="cuda").manual_seed(0)
        z = (3 * torch.randn(T, 2 * F, device="cuda", generator=g)).bfloat16().requires_grad_()
        dh = torch.randn(T, F, device="cuda", generator=g).bfloat16()
        n = T * F * 2  # bytes of one [T, F] bf16 tensor
        head = z[:4096].detach().float().requires_grad_()
        want = swiglu_reference(head)
        (want_dz,) = torch.autograd.grad(want, head, dh[:4096].float())
        got_z = z[:4096].detach().requires_grad_()
        got = swiglu(got_z, backend="triton")
        (got_dz,) = torch.autograd.grad(got, got_z, dh[:4096])
        err = max(((a.float() - b).norm() / b.norm()).item() for a, b in ((got, want), (got_dz, want_dz)))
        for name, backend in (("reference (chunk+silu+mul)", "torch"), ("triton", "triton")):
            def fwd(z=z, backend=backend):
                with torch.no_grad():
                    swiglu(z, backend=backend)

            def fwd_bwd(z=z, dh=dh, backend=backend):
                torch.autograd.grad(swiglu(z, backend=backend), z, dh)

            try:
                t_f = do_bench(fwd, rep=args.rep, return_mode="median")
                t_fb = do_bench(fwd_bwd, rep=args.rep, return_mode="median")
                cells = [f"{t_f:.3f}", f"{t_fb:.3f}", f"{3 * n / t_f / 1e6:.0f}", f"{8 * n / t_fb / 1e6:.0f}"]
            except torch.OutOfMemoryError:
                cells = [MISSING] * 4
            torch.cuda.empty_cache()
            print(f"| {T} | {name} | " + " | ".join(cells) + " |")
        print(f"<!-- {T}: max rel. error of triton vs fp32 reference on the first 4096 tokens: {err:.2e} -->")


if __name__ == "__main__":
    main()
