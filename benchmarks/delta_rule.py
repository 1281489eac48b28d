"""Benchmark: Triton chunked gated delta rule (kernels/delta_rule) vs flash-linear-attention 0.6.0
`chunk_gated_delta_rule` (issue 20).

    python benchmarks/delta_rule.py [--shapes 16x4096,1x65536,1x262144,1x1048576] [--out FILE] [--configs SPEC]
        [--kernels]

bf16 q, k (L2-normalized), v, β = σ(·), per-token gate g = −A·softplus(·) (Gated DeltaNet's, A ∈ [1, 16]), H = 16,
K = V = 128, no λ. Per shape and method: forward and forward+backward medians of `triton.testing.do_bench`
(gradients of q, k, v, β and g through torch.autograd.grad), peak memory of one forward+backward call
(torch.cuda.max_memory_allocated after a reset, inputs included) and the relative error of the output and of the
gradients on a prefix of the sequence against the fp32 chunked PyTorch reference (causal, so a prefix is exact; the
gradients take a cotangent that is zero past the prefix). fla is optional: without it its columns show "—". On
Hopper with Triton 3.4–3.7.0, fla 0.6.0 refuses its gated backward (fla issue #640: it computes wrong gradients
there); this script switches that guard off only to time fla, says so in the output, and fla's error column then
shows what the guard protects against. Rows that run out of memory show "—".
`--kernels` adds, per shape, where one forward+backward spends its GPU time: each Triton / CUDA kernel's calls
and device time under torch.profiler, ours (the first config) beside fla's.
Goals (issue 20): fwd+bwd ≤ 0.8 × fla's time at T ≥ 64K and ≤ 1.0 × at 4K; peak memory at 1M ≤ 0.6 × fla's;
error ≤ 1e-2.
"""

from __future__ import annotations

import argparse
import datetime
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import do_bench_ms, peak_fwd_fb  # noqa: E402
from kernels.delta_rule import delta_rule_chunked  # noqa: E402
from kernels.delta_rule.triton import DEFAULT_CONFIG, DeltaConfig, delta_rule_triton, with_config  # noqa: E402

H, D = 16, 128
DEFAULT_SHAPES = "16x4096,1x65536,1x262144,1x1048576"
CHECK_PREFIX = 2048
MISSING = "—"
NOTES: list[str] = []


def parse_shapes(spec: str) -> list[tuple[int, int]]:
    return [tuple(int(x) for x in item.lower().split("x")) for item in spec.split(",")]


def parse_configs(spec: str | None) -> dict[str, DeltaConfig]:
    """'name:key=val,key=val;name2:...' → named DeltaConfigs (fields of kernels.delta_rule.triton.DeltaConfig)."""
    if not spec:
        return {"default": DEFAULT_CONFIG}
    out = {}
    for part in spec.split(";"):
        name, _, kv = part.partition(":")
        kw = {}
        for item in filter(None, kv.split(",")):
            key, eq, val = item.partition("=")
            if not hasattr(DEFAULT_CONFIG, key):
                raise SystemExit(f"unknown DeltaConfig field {key!r}; fields: {', '.join(vars(DEFAULT_CONFIG))}")
            flag = isinstance(getattr(DEFAULT_CONFIG, key), bool)
            words = {"1": True, "true": True, "0": False, "false": False} if flag else {}
            if val.lower() in words:
                kw[key] = words[val.lower()]
            elif not flag and eq and val.lstrip("-").isdigit():
                kw[key] = int(val)
            else:
                raise SystemExit(f"--configs {name}: {key}={val!r} is not {'0/1' if flag else 'an integer'}; "
                                 f"write it as {key}={'1' if flag else getattr(DEFAULT_CONFIG, key)}")
        out[name] = with_config(**kw)
    return out


class Case:
    """Inputs of one shape (bf16 on the GPU) and the cotangent of the output."""

    def __init__(self, B: int, T: int, seed: int = 0):
        g = torch.Generator(device="cuda").manual_seed(seed)
        mk = lambda *s: torch.randn(*s, device="cuda", generator=g)  # noqa: E731
        self.q = mk(B, T, H, D).bfloat16()
        self.k = F.normalize(mk(B, T, H, D), dim=-1).bfloat16()
        self.v = mk(B, T, H, D).bfloat16()
        self.beta = torch.sigmoid(mk(B, T, H)).bfloat16()
        A = torch.empty(H, device="cuda").uniform_(1, 16, generator=g)
        self.g = (-A * F.softplus(mk(B, T, H) - 4.0)).float()
        self.do = mk(B, T, H, D).bfloat16()

    def leaves(self) -> list[torch.Tensor]:
        return [x.detach().requires_grad_() for x in (self.q, self.k, self.v, self.beta, self.g)]


def ours(cfg: DeltaConfig):
    def call(q, k, v, beta, g):
        return delta_rule_triton(q, k, v, beta, gate=g, config=cfg)[0]
    return call


def fla_call(q, k, v, beta, g):
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    return chunk_gated_delta_rule(q, k, v, g, beta, scale=D**-0.5)[0]


def switch_off_fla_hopper_guard() -> bool:
    """fla 0.6.0's chunk_bwd_dqkwg raises on Hopper with Triton 3.4–3.7.0 (issue #640); turn that check off in its
    module (timing only: the gradients it then computes are the wrong ones the guard protects against)."""
    try:
        import fla.ops.common.chunk_o as chunk_o
    except ImportError:
        return False
    changed = False
    for flag in ("IS_NVIDIA_HOPPER", "TRITON_ABOVE_3_4_0"):
        if getattr(chunk_o, flag, False):
            setattr(chunk_o, flag, False)
            changed = True
    return changed


def bench_ms(fn) -> float:
    return do_bench_ms(fn, warmup=10, rep=50)


def errors(call, c: Case) -> float:
    """Largest relative error of o and of the five gradients on the first CHECK_PREFIX tokens, against the fp32
    chunked reference."""
    n = min(CHECK_PREFIX, c.q.shape[1])
    pre = lambda x: x[:, :n].detach()  # noqa: E731
    xs = [pre(x).requires_grad_() for x in (c.q, c.k, c.v, c.beta, c.g)]
    o = call(*xs)
    grads = torch.autograd.grad(o, xs, pre(c.do))
    rs = [pre(x).float().requires_grad_() for x in (c.q, c.k, c.v, c.beta, c.g)]
    o_r = delta_rule_chunked(rs[0], rs[1], rs[2], rs[3], gate=rs[4], scale=D**-0.5)[0]
    grads_r = torch.autograd.grad(o_r, rs, pre(c.do).float())
    rel = lambda a, b: ((a.float() - b).norm() / b.norm()).item()  # noqa: E731
    return max(rel(a, b) for a, b in zip([o, *grads], [o_r, *grads_r]))


def measure(call, c: Case) -> dict:
    res: dict[str, object] = {"fwd": None, "fb": None, "peak": None, "err": None, "note": ""}
    t0 = time.perf_counter()
    try:
        res["err"] = errors(call, c)
        xs = c.leaves()

        def fwd():
            with torch.no_grad():
                call(*xs)

        def fb():
            torch.autograd.grad(call(*xs), xs, c.do)

        peak_fwd_fb(fwd, fb, res, bench_ms)
    except torch.OutOfMemoryError:
        res["note"] = "OOM"
    except Exception as exc:  # a library refusing a configuration: report, keep going
        res["note"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    res["wall_s"] = round(time.perf_counter() - t0, 1)
    return res


def run_shape(B: int, T: int, configs: dict[str, DeltaConfig], with_fla: bool, kernels: bool = False) -> dict:
    c = Case(B, T)
    row: dict[str, object] = {"shape": f"{B}×{T // 1024}K", "ours": {}}
    for name, cfg in configs.items():
        row["ours"][name] = measure(ours(cfg), c)
        print(f"  {row['shape']} ours {name}: {row['ours'][name]}", flush=True)
    if with_fla:
        res = measure(fla_call, c)
        if "#640" in str(res["note"]) and switch_off_fla_hopper_guard():
            NOTES.append("fla's Hopper guard (issue #640, Triton 3.4–3.7.0: wrong gradients reported) was switched "
                         "off to time it; its error column (output and every gradient against the fp32 reference) "
                         "says whether they were right at these shapes")
            res = measure(fla_call, c)
        row["fla"] = res
        print(f"  {row['shape']} fla: {row['fla']}", flush=True)
    if kernels:
        first = next(iter(configs))
        named = {f"ours ({first})": profile_kernels(ours(configs[first]), c)}
        if with_fla and row["fla"].get("fb") is not None:
            named["fla"] = profile_kernels(fla_call, c)
        row["kernels"] = render_kernels(row["shape"], named)
    del c
    torch.cuda.empty_cache()
    return row


def kernel_times(events) -> list[tuple[str, int, float]]:
    """(kernel name, calls, device ms) of the profiler's device-side events, longest first."""
    total: dict[str, list] = {}
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            ms = (getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0.0)) / 1e3
            entry = total.setdefault(e.name, [0, 0.0])
            entry[0] += 1
            entry[1] += ms
    return sorted(((name, n, ms) for name, (n, ms) in total.items()), key=lambda r: -r[2])


def profile_kernels(call, c: Case) -> list[tuple[str, int, float]]:
    """One forward+backward of `call` (after a warm-up call) under torch.profiler: its kernels' device time."""
    xs = c.leaves()
    torch.autograd.grad(call(*xs), xs, c.do)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad(call(*xs), xs, c.do)
        torch.cuda.synchronize()
    return kernel_times(prof.events())


def render_kernels(shape: str, named: dict[str, list[tuple[str, int, float]]], top: int = 12) -> str:
    """A table per implementation: its `top` longest kernels (name, calls, ms, share of its fwd+bwd)."""
    lines = []
    for impl, rows in named.items():
        total = sum(ms for _, _, ms in rows) or float("nan")
        lines += [f"{shape}, {impl}: {total:.2f} ms of kernels in one forward+backward", "",
                  "| kernel | calls | ms | share |", "|---|---|---|---|"]
        lines += [f"| `{name[:80]}` | {n} | {ms:.3f} | {100 * ms / total:.1f} % |" for name, n, ms in rows[:top]]
        if len(rows) > top:
            rest = sum(ms for _, _, ms in rows[top:])
            lines.append(f"| {len(rows) - top} more | {sum(n for _, n, _ in rows[top:])} | {rest:.3f} | "
                         f"{100 * rest / total:.1f} % |")
        lines.append("")
    return "\n".join(lines)


def fmt(x, digits: int = 2) -> str:
    return MISSING if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def ratio(a, b) -> str:
    return MISSING if a is None or b is None else f"{a / b:.2f}"


def render(rows: list[dict], names: list[str]) -> str:
    hdr = ("| B×T | config | ours fwd / f+b ms | fla fwd / f+b ms | f+b ours÷fla | peak GiB ours / fla | mem ours÷fla "
           "| err ours / fla |")
    lines = [hdr, "|" + "|".join(["---"] * (hdr.count("|") - 1)) + "|"]
    for r in rows:
        fl = r.get("fla") or {}
        for name in names:
            o = r["ours"][name]
            lines.append("| " + " | ".join([
                r["shape"], name, f"{fmt(o['fwd'])} / {fmt(o['fb'])}", f"{fmt(fl.get('fwd'))} / {fmt(fl.get('fb'))}",
                ratio(o["fb"], fl.get("fb")), f"{fmt(o['peak'], 1)} / {fmt(fl.get('peak'), 1)}",
                ratio(o["peak"], fl.get("peak")),
                f"{fmt(o['err'], 4)} / {fmt(fl.get('err'), 4)}"]) + " |")
    notes = NOTES + [f"{r['shape']} fla: {r['fla']['note']}" for r in rows if (r.get("fla") or {}).get("note")]
    notes += [f"{r['shape']} ours {k}: {v['note']}" for r in rows for k, v in r["ours"].items() if v.get("note")]
    if notes:
        lines += ["", "Notes: " + "; ".join(dict.fromkeys(notes))]
    lines += ["\n" + r["kernels"] for r in rows if r.get("kernels")]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of BxT (default %(default)s)")
    ap.add_argument("--configs", default=None, help="named DeltaConfigs 'name:k=v,...;name2:...' (tuning)")
    ap.add_argument("--no-fla", action="store_true", help="our kernels only")
    ap.add_argument("--out", default=None, help="also write the markdown table to this file")
    ap.add_argument("--kernels", action="store_true", help="per shape, each kernel's GPU time in one fwd+bwd")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("delta_rule benchmark: needs a CUDA device")
    import triton

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"date {datetime.date.today()}", flush=True)
    with_fla = not args.no_fla
    if with_fla:
        try:
            import fla

            print(f"fla {getattr(fla, '__version__', '?')}", flush=True)
        except ImportError:
            print("fla not importable: its columns show —", flush=True)
            with_fla = False
    configs = parse_configs(args.configs)
    rows = []
    for B, T in parse_shapes(args.shapes):
        rows.append(run_shape(B, T, configs, with_fla, args.kernels))
        if args.out:  # the table so far: a run stopped by a time limit keeps its finished rows
            Path(args.out).write_text(render(rows, list(configs)))
    print(render(rows, list(configs)))


if __name__ == "__main__":
    main()
