"""Tuning sweep of the Triton linear-attention kernels (issue 4): where the time goes, which tiles win.

    python benchmarks/tune_linear_attention.py [--fwd-shapes 1x65536,1x262144] [--gate-shape 1x65536]

Three parts, all bf16, H = 16, K = V = 128, RetNet decay, on random inputs:

1. forward of every config in --fwd-configs, checked against the default config's output first,
   timed with `triton.testing.do_bench` (median), as a ratio to the roofline floor of
   benchmarks/linear_attention.py;
2. forward+backward of the decay-gradient variants at --gate-shape: constant decay, gate without
   grad, gate with grad under each decay-gradient mode (hilo, exact) and backward config, with the
   dgate error against the fp64 chunked reference on a prefix;
3. with --profile, the CUDA time per kernel of one constant and one gated forward+backward.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.triton.backward as triton_bwd  # noqa: E402  (its DG_MODE switch)
from benchmarks.linear_attention import bench_ms, floor_ms, parse_configs, parse_shapes  # noqa: E402
from kernels.reference import linear_attention_chunked  # noqa: E402
from kernels.triton import DEFAULT_CONFIG, linear_attention_triton  # noqa: E402

H, D = 16, 128
DEFAULT_FWD = ("default:;bv128:fwd_bv=128;bv128w8:fwd_bv=128,fwd_warps=8;bv32:fwd_bv=32;"
               "w8:fwd_warps=8;st1:num_stages=1;st3:num_stages=3;seg16:seg_chunks=16;seg64:seg_chunks=64;"
               "c128:chunk=128;c128bv128w8:chunk=128,fwd_bv=128,fwd_warps=8;sw4:state_warps=4;"
               "s64:state_bk=64,state_bv=64,state_warps=4")
DEFAULT_BWD = ("default:;dq8:dq_warps=8;dkdv8:dkdv_warps=8;bc32:bwd_chunk=32;st1:num_stages=1;"
               "st3:num_stages=3;dqbk32:dq_bk=32;dkbk32:dkdv_bk=32")


def inputs(B: int, T: int, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
    lam = torch.log1p(-torch.exp2(-5.0 - 5.0 * torch.arange(H, device="cuda") / H)).float()
    gate = (F.logsigmoid(mk(B, T, H).float() + 4.0) / 16).to(torch.bfloat16)
    return dict(q=mk(B, T, H, D), k=mk(B, T, H, D), v=mk(B, T, H, D), do=mk(B, T, H, D), lam=lam, gate=gate)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def sweep_forward(shapes: list[tuple[int, int]], configs: dict) -> None:
    print("\n## forward sweep (ms, do_bench median; ratio to floor)")
    for B, T in shapes:
        x = inputs(B, T)
        floor = floor_ms(B, T)
        ref = None
        for name, cfg in configs.items():
            try:
                with torch.no_grad():
                    def run(c=cfg, x=x):
                        return linear_attention_triton(x["q"], x["k"], x["v"], log_decay=x["lam"], config=c)
                    o = run()[0]
                    if ref is None:
                        ref = o.float()
                    err = rel(o, ref)
                    if err > 1e-2:
                        print(f"{B}x{T} {name}: WRONG rel err {err:.2e}", flush=True)
                        continue
                    ms = bench_ms(run)
                print(f"{B}x{T} {name:14s} fwd {ms:7.3f} ms  ÷floor {ms / floor:5.2f}  err {err:.1e}", flush=True)
            except Exception as exc:  # a config the compiler refuses: report, keep going
                print(f"{B}x{T} {name}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}", flush=True)
        x.clear()
        torch.cuda.empty_cache()


def fwd_bwd(x: dict, cfg, gate: str):
    """gate: 'none' (constant decay), 'nograd', 'grad'."""
    q, k, v = (x[n].detach().requires_grad_() for n in ("q", "k", "v"))
    leaves = [q, k, v]
    g = None
    if gate != "none":
        g = x["gate"].detach().requires_grad_(gate == "grad")
        if gate == "grad":
            leaves.append(g)

    def run():
        o = linear_attention_triton(q, k, v, log_decay=x["lam"], gate=g, config=cfg)[0]
        return torch.autograd.grad(o, leaves, x["do"])
    return run


def sweep_gate(B: int, T: int, configs: dict, prefix: int) -> None:
    print(f"\n## decay-gradient variants, {B}x{T} fwd+bwd (ms, do_bench median); dgate err on {prefix} tokens")
    x = inputs(B, T)
    n = min(T, prefix)
    xp = {key: (val[:, :n].contiguous() if val.dim() > 1 else val) for key, val in x.items()}
    gq = xp["gate"].double().requires_grad_()
    o_ref = linear_attention_chunked(xp["q"].double(), xp["k"].double(), xp["v"].double(),
                                     log_decay=xp["lam"].double(), gate=gq)[0]
    (dg_ref,) = torch.autograd.grad(o_ref, gq, xp["do"].double())
    base = None
    for mode_name, mode in (("auto", None), ("plain", (False, False)), ("hilo", (True, False))):
        triton_bwd.DG_MODE = mode
        for name, cfg in configs.items():
            if mode_name != "auto" and name != "default":
                continue
            for gate in ("none", "nograd", "grad"):
                if gate != "grad" and (mode_name != "auto"):
                    continue
                try:
                    err = float("nan")
                    if gate == "grad":
                        dg = fwd_bwd(xp, cfg, "grad")()[3]
                        err = rel(dg, dg_ref)
                    ms = bench_ms(fwd_bwd(x, cfg, gate))
                    if gate == "none" and name == "default":
                        base = ms
                    ratio = ms / base if base else float("nan")
                    print(f"{name:10s} mode {mode_name:5s} gate {gate:6s} f+b {ms:7.3f} ms  ÷const {ratio:5.2f}  "
                          f"dgate err {err:.2e}", flush=True)
                except Exception as exc:
                    print(f"{name} {mode_name} {gate}: {type(exc).__name__}: {str(exc).splitlines()[0][:150]}",
                          flush=True)
    triton_bwd.DG_MODE = None


def gate_accuracy(lengths: list[int], configs: dict) -> None:
    """d gate error with λ fixed (the models' case) on the GPU tests' inputs, per config and length."""
    print("\n## d gate error, λ fixed, bf16, B=1 H=2 (test inputs: gate logsigmoid(x+2)/4, λ_h = log(1-2^(-2-h)))")
    for name, cfg in configs.items():
        errs = []
        for T in lengths:
            g = torch.Generator().manual_seed(11)
            rnd = lambda *shape, g=g: torch.randn(*shape, generator=g).cuda()  # noqa: E731
            q, k, v = (rnd(1, T, 2, D).bfloat16() for _ in range(3))
            gate = (F.logsigmoid(rnd(1, T, 2) + 2.0) / 4).bfloat16()
            lam = torch.log1p(-torch.exp2(-2.0 - torch.arange(2, dtype=torch.float32))).cuda()
            do = rnd(1, T, 2, D).bfloat16()
            gl = gate.detach().requires_grad_()
            o = linear_attention_triton(q, k, v, log_decay=lam, gate=gl, config=cfg)[0]
            (dg,) = torch.autograd.grad(o, gl, do)
            g64 = gate.double().requires_grad_()
            o_r = linear_attention_chunked(q.double(), k.double(), v.double(), log_decay=lam.double(), gate=g64)[0]
            (dg_r,) = torch.autograd.grad(o_r, g64, do.double())
            errs.append(f"T={T}: {rel(dg, dg_r):.2e}")
        print(f"{name:12s} " + "  ".join(errs), flush=True)


def profile(B: int, T: int) -> None:
    x = inputs(B, T)
    for gate in ("none", "nograd", "grad"):
        run = fwd_bwd(x, DEFAULT_CONFIG, gate)
        run()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                run()
            torch.cuda.synchronize()
        print(f"\n## profile {B}x{T} gate={gate} (3 calls)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=48))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fwd-shapes", default="1x65536,1x262144")
    ap.add_argument("--fwd-configs", default=DEFAULT_FWD)
    ap.add_argument("--gate-shape", default="1x65536")
    ap.add_argument("--bwd-configs", default=DEFAULT_BWD)
    ap.add_argument("--prefix", type=int, default=16384, help="tokens of the dgate accuracy check")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--parts", default="fwd,gate", help="subset of fwd,gate,acc")
    ap.add_argument("--acc-lengths", default="1000,16384,65536")
    ap.add_argument("--acc-configs", default="default:;tail4:tail_chunks=4;tail16:tail_chunks=16")
    args = ap.parse_args()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    parts = set(args.parts.split(","))
    if "fwd" in parts:
        sweep_forward(parse_shapes(args.fwd_shapes), parse_configs(args.fwd_configs))
    if "gate" in parts:
        (B, T), = parse_shapes(args.gate_shape)
        sweep_gate(B, T, parse_configs(args.bwd_configs), args.prefix)
    if "acc" in parts:
        gate_accuracy([int(t) for t in args.acc_lengths.split(",")], parse_configs(args.acc_configs))
    if args.profile:
        (B, T), = parse_shapes(args.gate_shape)
        profile(B, T)


if __name__ == "__main__":
    main()
