"""Benchmark: Triton chunked linear attention vs flash-linear-attention 0.6.0 and torch SDPA (issue 4).

    python benchmarks/linear_attention.py [--shapes 16x4096,1x65536] [--out FILE] [--configs SPEC]

bf16, H = 16, K = V = 128. Per shape: forward and forward+backward medians (`triton.testing.do_bench`,
L2 cleared before each run, gradients of q, k, v and the gate through torch.autograd.grad), peak memory
of one forward+backward call (torch.cuda.max_memory_allocated after a reset, inputs included), and
the forward roofline floor max(FLOPs / 731 TFLOP/s, bytes / 3.0 TB/s) with
FLOPs = 2·B·H·T·(C·K + C·V + 2·K·V) (chunked algorithm, C = 64) and bytes = B·T·H·(2K + 2V)·2
(q, k, v read once, o written once). Before timing, every method's output is checked: ours on a
prefix against the fp32 chunked PyTorch reference (causal, so a prefix is exact), the others against ours.
Rows that run out of memory or that a library refuses show "—".
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import do_bench_ms, peak_fwd_fb  # noqa: E402
from kernels.reference import linear_attention_chunked  # noqa: E402
from kernels.triton import DEFAULT_CONFIG, TritonConfig, linear_attention_triton, with_config  # noqa: E402

H, D = 16, 128
PEAK_FLOPS, PEAK_BW = 731e12, 3.0e12  # H100 ceilings measured here (DESIGN §8)
DEFAULT_SHAPES = "16x4096,4x16384,1x65536,1x262144,1x1048576"
SDPA_MAX_T = 262144
CHECK_PREFIX = 4096
MISSING = "—"


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    out = []
    for item in spec.split(","):
        b, t = item.lower().split("x")
        out.append((int(b), int(t)))
    return out


def parse_configs(spec: str | None) -> dict[str, TritonConfig]:
    """'name:key=val,key=val;name2:...' → named TritonConfigs (fields of kernels.triton.TritonConfig)."""
    if not spec:
        return {"default": DEFAULT_CONFIG}
    out = {}
    for part in spec.split(";"):
        name, _, kv = part.partition(":")
        kw: dict[str, object] = {}
        for item in filter(None, kv.split(",")):
            key, val = item.split("=")
            if not hasattr(DEFAULT_CONFIG, key):
                fields = ", ".join(vars(DEFAULT_CONFIG))
                raise SystemExit(f"unknown TritonConfig field {key!r} in --configs; fields: {fields}")
            kw[key] = val.lower() in ("1", "true") if isinstance(getattr(DEFAULT_CONFIG, key), bool) else int(val)
        out[name] = with_config(**kw)
    return out


def floor_ms(B: int, T: int, C: int = 64) -> float:
    flops = 2 * B * H * T * (C * D + C * D + 2 * D * D)
    nbytes = B * T * H * (2 * D + 2 * D) * 2
    return 1e3 * max(flops / PEAK_FLOPS, nbytes / PEAK_BW)


bench_ms = do_bench_ms  # warm-up 25 ms, 100 ms of runs


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


class Case:
    """Inputs of one shape: q, k, v, do bf16; λ_h per head (constant, no grad); gate ≤ 0 (requires grad)."""

    def __init__(self, B: int, T: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        mk = lambda *s: torch.randn(*s, device="cuda", generator=g, dtype=torch.bfloat16)  # noqa: E731
        self.B, self.T = B, T
        self.q, self.k, self.v = mk(B, T, H, D), mk(B, T, H, D), mk(B, T, H, D)
        self.do = mk(B, T, H, D)
        # RetNet-style slopes: 1 − a_h = 2^(−5 − 5h/H)
        self.log_decay = torch.log1p(-torch.exp2(-5.0 - 5.0 * torch.arange(H, device="cuda") / H)).float()
        self.gate = (F.logsigmoid(mk(B, T, H).float() + 4.0) / 16).to(torch.bfloat16)

    def leaves(self, gate: bool) -> list[torch.Tensor]:
        xs = [self.q, self.k, self.v] + ([self.gate] if gate else [])
        return [x.detach().requires_grad_() for x in xs]


def method_ours(cfg: TritonConfig, gated: bool):
    def call(c: Case, xs: list[torch.Tensor]) -> torch.Tensor:
        return linear_attention_triton(xs[0], xs[1], xs[2], log_decay=c.log_decay,
                                       gate=xs[3] if gated else None, config=cfg)[0]
    return call


def method_fla_simple_gla(c: Case, xs: list[torch.Tensor]) -> torch.Tensor:
    from fla.ops.simple_gla import chunk_simple_gla

    return chunk_simple_gla(xs[0], xs[1], xs[2], g_gamma=c.log_decay, scale=D**-0.5)[0]


def method_fla_linear_attn(c: Case, xs: list[torch.Tensor]) -> torch.Tensor:
    from fla.ops.linear_attn import chunk_linear_attn

    return chunk_linear_attn(xs[0], xs[1], xs[2], scale=D**-0.5, normalize=False)[0]


def method_sdpa(c: Case, xs: list[torch.Tensor]) -> torch.Tensor:
    q, k, v = (x.transpose(1, 2) for x in xs[:3])
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)


def reference_prefix(c: Case, gated: bool, decay: bool = True) -> torch.Tensor:
    n = min(c.T, CHECK_PREFIX)
    sl = lambda x: x[:, :n].float()  # noqa: E731
    return linear_attention_chunked(sl(c.q), sl(c.k), sl(c.v), log_decay=c.log_decay if decay else None,
                                    gate=sl(c.gate) if gated else None)[0]


def softmax_prefix(c: Case, n: int) -> torch.Tensor:
    """Causal softmax attention of the first n tokens in fp32 (the SDPA check)."""
    q, k, v = (x[:, :n].float().transpose(1, 2) for x in (c.q, c.k, c.v))
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    return (s.softmax(-1) @ v).transpose(1, 2)


def measure(c: Case, call, gated: bool, check: Callable[[torch.Tensor], float] | None) -> dict:
    """fwd ms, fwd+bwd ms, peak GiB and check error of one method; values are None where it failed."""
    res: dict[str, object] = {"fwd": None, "fb": None, "peak": None, "err": None, "note": ""}
    t0 = time.perf_counter()
    try:
        xs = c.leaves(gated)
        with torch.no_grad():
            o = call(c, xs)
        if check is not None:
            res["err"] = check(o)
        del o

        def fwd():
            with torch.no_grad():
                call(c, xs)

        def fb():
            out = call(c, xs)
            torch.autograd.grad(out, xs, c.do)

        peak_fwd_fb(fwd, fb, res, bench_ms)
    except torch.OutOfMemoryError:
        res["note"] = "OOM"
    except Exception as exc:  # a library refusing a configuration: report, keep going
        res["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_shape(B: int, T: int, methods: set[str], configs: dict[str, TritonConfig]) -> dict:
    """All methods on one B×T; returns the row for render()."""
    c = Case(B, T)
    n = min(T, CHECK_PREFIX)
    ref_const = reference_prefix(c, gated=False)
    row: dict[str, object] = {"shape": f"{B}×{T // 1024}K", "floor": floor_ms(B, T), "ours": {}, "tokens": (B * T, T)}
    for name, cfg in configs.items():
        if "ours" in methods:
            row["ours"][name] = measure(c, method_ours(cfg, False), False, lambda o: rel_err(o[:, :n], ref_const))
        if "gate" in methods:
            ref_g = reference_prefix(c, gated=True)
            row["ours"][name + "+gate"] = measure(c, method_ours(cfg, True), True,
                                                  lambda o, r=ref_g: rel_err(o[:, :n], r))
        print(f"  {row['shape']} {name}: {({k: v for k, v in row['ours'].items() if k.startswith(name)})}",
              flush=True)
    if "fla" in methods:
        row["fla"] = measure(c, method_fla_simple_gla, False, lambda o: rel_err(o[:, :n], ref_const))
        print(f"  {row['shape']} fla simple_gla: {row['fla']}", flush=True)
    if "fla_la" in methods:
        ref_la = reference_prefix(c, gated=False, decay=False)
        row["fla_la"] = measure(c, method_fla_linear_attn, False, lambda o: rel_err(o[:, :n], ref_la))
        print(f"  {row['shape']} fla linear_attn: {row['fla_la']}", flush=True)
    if "sdpa" in methods and T <= SDPA_MAX_T:
        ref_sm = softmax_prefix(c, 1024)
        row["sdpa"] = measure(c, method_sdpa, False, lambda o: rel_err(o[:, :1024], ref_sm))
        print(f"  {row['shape']} sdpa: {row['sdpa']}", flush=True)
    return row


def profile(B: int, T: int, cfg: TritonConfig, gated: bool, title: str) -> None:
    """Print the CUDA time of each kernel in one of our fwd+bwd calls (after a warm-up)."""
    c = Case(B, T)
    xs = c.leaves(gated)
    call = method_ours(cfg, gated)
    for _ in range(2):
        torch.autograd.grad(call(c, xs), xs, c.do)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            torch.autograd.grad(call(c, xs), xs, c.do)
        torch.cuda.synchronize()
    print(f"== {title}")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=40))


def fmt(x: float | None, digits: int = 2) -> str:
    return MISSING if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return MISSING if a is None or b is None else f"{a / b:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BxT")
    ap.add_argument("--configs", default=None, help="named Triton configs 'name:k=v,...;name2:...' (tuning)")
    ap.add_argument("--methods", default="ours,gate,fla,fla_la,sdpa", help="subset of ours,gate,fla,fla_la,sdpa")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--profile", action="store_true", help="per-kernel CUDA times of our fwd+bwd per shape")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    methods = set(args.methods.split(","))
    configs = parse_configs(args.configs)
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}, torch {torch.__version__}, date {datetime.date.today()}", flush=True)
    try:
        import fla  # noqa: F401
        import triton
        print(f"fla {getattr(fla, '__version__', '?')}, triton {triton.__version__}", flush=True)
    except ImportError:
        print("fla not importable: its rows show —", flush=True)

    if args.profile:
        for B, T in parse_shapes(args.shapes):
            for name, cfg in configs.items():
                for gated in (False, True):
                    profile(B, T, cfg, gated, f"{B}x{T} {name}{' +gate' if gated else ''}")
        return
    rows = []
    for B, T in parse_shapes(args.shapes):
        rows.append(run_shape(B, T, methods, configs))
        torch.cuda.empty_cache()
        if args.out:  # the table so far, so a run stopped by a time limit keeps its finished rows
            Path(args.out).write_text(render(rows, list(configs)) + "\n")

    table = render(rows, list(configs))
    print(table)


def render(rows: list[dict], config_names: list[str]) -> str:
    """Markdown: times in ms (fwd / fwd+bwd), peak GiB of one fwd+bwd, ratios against the goals."""
    get = lambda r, m, k: (r.get(m) or {}).get(k)  # noqa: E731
    rows = sorted(rows, key=lambda r: r["tokens"])
    lines = []
    for name in config_names:
        hdr = ("| B×T | floor fwd | ours fwd / f+b | ours+gate fwd / f+b | fla simple_gla fwd / f+b "
               "| fla linear_attn fwd / f+b | SDPA fwd / f+b | peak GiB ours / gate / fla "
               "| f+b ours÷fla | gate÷ours | fwd÷floor | err ours / gate |")
        lines += [f"config `{name}`", "", hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
        for r in rows:
            o, og = r["ours"].get(name, {}), r["ours"].get(name + "+gate", {})
            fl, la, sd = r.get("fla") or {}, r.get("fla_la") or {}, r.get("sdpa") or {}
            cells = [
                r["shape"], fmt(r["floor"], 3),
                f"{fmt(o.get('fwd'))} / {fmt(o.get('fb'))}", f"{fmt(og.get('fwd'))} / {fmt(og.get('fb'))}",
                f"{fmt(fl.get('fwd'))} / {fmt(fl.get('fb'))}", f"{fmt(la.get('fwd'))} / {fmt(la.get('fb'))}",
                f"{fmt(sd.get('fwd'))} / {fmt(sd.get('fb'))}",
                f"{fmt(o.get('peak'), 1)} / {fmt(og.get('peak'), 1)} / {fmt(fl.get('peak'), 1)}",
                ratio(o.get("fb"), fl.get("fb")), ratio(og.get("fb"), o.get("fb")),
                ratio(o.get("fwd"), r["floor"]),
                f"{fmt(o.get('err'), 4) if o.get('err') is not None else MISSING} / "
                f"{fmt(og.get('err'), 4) if og.get('err') is not None else MISSING}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
        notes = [f"{r['shape']} {m}: {get(r, m, 'note')}" for r in rows for m in ("fla", "fla_la", "sdpa")
                 if get(r, m, "note")]
        notes += [f"{r['shape']} {k}: {v['note']}" for r in rows for k, v in r["ours"].items() if v.get("note")]
        if notes:
            lines += ["", "Notes: " + "; ".join(notes)]
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
