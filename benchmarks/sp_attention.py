"""Benchmark: softmax attention under sequence parallelism, LASP-2 weak scaling (issue 5), and the
attention kernels on one GPU (issue 24).

    torchrun --nproc-per-node 2 benchmarks/sp_attention.py [--seq-lens 32768,131072,262144] [--backend auto]
        [--out FILE]
    python benchmarks/sp_attention.py --backends cudnn,flash [--seq-lens 32768,131072] [--out FILE]

`--backends` (one GPU, no torchrun): causal attention forward+backward through our block entry
(`parallel.attention.dense_attention`, the single-GPU softmax mixer's path) on each kernel of
`model.attention_backend` listed, and torch SDPA pinned to its flash and cuDNN kernels as anchors (DESIGN §8);
bf16, batch 1, 32 q / 8 kv heads, head dim 128. Each row is checked against the first backend listed
(output, dq, dk, dv; relative L2, bf16) before it is timed; the table gives cudnn / flash (goal ≤ 0.62).
`--backend` (torchrun mode): the kernel of the 1-GPU row and of every sp method (default auto).

Causal attention forward+backward, bf16, 32 query heads, 8 kv heads, head dim 128, batch 1, the
sequence cut zigzag over the ranks: each method of `parallel.attention.sp_attention` (ring,
allgather, ulysses) on all ranks vs the same attention (SDPA, flash kernel) on the whole sequence on
one GPU, and vs torch's experimental `context_parallel` ring attention (both of its kv rotations)
in the same run. Before timing, every method's output and dq, dk, dv are checked against the
one-GPU result (relative L2 error, bf16). Times are medians over repetitions after a warm-up, each
repetition fenced by a barrier and CUDA events and taken from the slowest rank.

LASP-2 weak scaling: `parallel.lasp2.lasp2_linear_attention` (H = 16, K = V = 128, bf16, RetNet
decay, backend auto) forward+backward at --lasp-tokens per GPU on all ranks vs the same number of
tokens on one GPU; efficiency = t_1 / t_P.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._timing import fenced_ms  # noqa: E402
from models.llama import retnet_log_decay  # noqa: E402
from parallel.attention import _dense_attention, choose_backend, sp_attention  # noqa: E402
from parallel.context import ATTENTION_BACKENDS  # noqa: E402
from parallel.lasp2 import lasp2_linear_attention  # noqa: E402
from parallel.layout import shard_sequence  # noqa: E402

HQ, HKV, D = 32, 8, 128
LASP_H, LASP_K = 16, 128
METHODS = ("ring", "allgather", "ulysses")
TOL = 3e-2  # bf16 against bf16
DEV, DTYPE = "cuda", torch.bfloat16  # --smoke: "cpu", float32 (a dry run of the script's logic on gloo)


def log(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def timed(fn: Callable[[], None], reps: int, warmup: int) -> float:
    """Median milliseconds of fn over `reps` runs (slowest rank per run), after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = [fenced_ms(fn, DEV == "cuda") for _ in range(reps)]
    t = torch.tensor(times, device=DEV)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return statistics.median(t.tolist())


def fwd_bwd(attn: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor) -> Callable:
    def step() -> None:
        for x in (q, k, v):
            x.grad = None
        attn(q, k, v).backward(dout)

    return step


def leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_()


def bench_attention(T: int, reps: int, warmup: int, methods: list[str], cp_rotations: list[str], mesh,
                    failed: set[str], backend: str = "auto") -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    g = torch.Generator(device=DEV).manual_seed(T)
    q = torch.randn(1, T, HQ, D, device=DEV, dtype=DTYPE, generator=g)
    k = torch.randn(1, T, HKV, D, device=DEV, dtype=DTYPE, generator=g)
    v = torch.randn(1, T, HKV, D, device=DEV, dtype=DTYPE, generator=g)
    dout = torch.randn(1, T, HQ, D, device=DEV, dtype=DTYPE, generator=g)
    row: dict = {"T": T}
    scale = D**-0.5

    # one GPU: the whole sequence (every rank runs it on its own GPU, no communication)
    qf, kf, vf = leaf(q), leaf(k), leaf(v)
    dense = lambda a, b, c: _dense_attention(a, b, c, scale, True, backend)  # noqa: E731
    step = fwd_bwd(dense, qf, kf, vf, dout)
    o = dense(qf, kf, vf)
    o.backward(dout)  # the verification run doubles as the warm-up
    ref = {"o": o.detach(), "q": qf.grad, "k": kf.grad, "v": vf.grad}
    del o
    row["1gpu"] = timed(step, reps, warmup)
    row["kernel"] = choose_backend(q, k, True, backend)
    log(f"T={T}: 1 GPU ({row['kernel']}) {row['1gpu']:.1f} ms")
    del qf, kf, vf, step

    def local(x: torch.Tensor) -> torch.Tensor:
        return shard_sequence(x, rank, world, "zigzag").contiguous()

    ref_local = {name: local(t) for name, t in ref.items()}
    del ref
    dl = local(dout)
    for method in methods:
        if method in failed:  # failed at a shorter sequence: do not spend device time on it again
            row[method] = None
            continue
        try:
            ql, kl, vl = leaf(local(q)), leaf(local(k)), leaf(local(v))

            def attn(a, b, c, method=method):
                return sp_attention(a, b, c, method=method, layout="zigzag", backend=backend)

            step = fwd_bwd(attn, ql, kl, vl, dl)
            o = attn(ql, kl, vl)
            o.backward(dl)
            o = o.detach()
            err = max(rel(o, ref_local["o"]), rel(ql.grad, ref_local["q"]), rel(kl.grad, ref_local["k"]),
                      rel(vl.grad, ref_local["v"]))
            errs = torch.tensor([err], device=DEV)
            dist.all_reduce(errs, op=dist.ReduceOp.MAX)
            row[f"{method}_err"] = errs.item()
            if errs.item() > TOL:
                raise RuntimeError(f"{method} differs from one GPU: relative error {errs.item():.3g}")
            row[method] = timed(step, reps, warmup)
            log(f"T={T}: {method} {row[method]:.1f} ms (max rel err {row[f'{method}_err']:.2e})")
            del ql, kl, vl, step, o
        except Exception as e:  # keep the other rows
            row[method] = None
            failed.add(method)
            log(f"T={T}: {method} FAILED: {type(e).__name__}: {str(e)[:300]}")
            if rank == 0:
                traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()

    for rotate in cp_rotations:
        if f"cp_{rotate}" in failed:
            continue
        try:
            row[f"cp_{rotate}"], row[f"cp_{rotate}_err"], row["cp_note"] = _torch_cp(
                q, k, v, dout, ref_local, rotate, reps, warmup, mesh)
            log(f"T={T}: torch context_parallel ({rotate}) {row[f'cp_{rotate}']:.1f} ms "
                f"(max rel err {row[f'cp_{rotate}_err']:.2e}{row['cp_note']})")
        except Exception as e:
            row[f"cp_{rotate}"] = None
            failed.add(f"cp_{rotate}")
            log(f"T={T}: torch context_parallel ({rotate}) FAILED: {type(e).__name__}: {str(e)[:300]}")
            if rank == 0:
                traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return row


# -- one GPU: the kernels behind the block entry (issue 24) -------------------------------------------------
SDPA_KERNELS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION"}  # torch SDPA pinned (anchors)
GOAL_CUDNN_OVER_FLASH = 0.62


def _kernel_attention(name: str) -> tuple[Callable, list[str]]:
    """attn(q, k, v) on [B, T, H, D] for a `model.attention_backend` value or an SDPA anchor; notes it adds."""
    if name not in SDPA_KERNELS:
        return (lambda a, b, c: _dense_attention(a, b, c, None, True, name)), []
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernel, notes = getattr(SDPBackend, SDPA_KERNELS[name]), []

    def attn(a, b, c):
        with sdpa_kernel([kernel]):
            t = [x.transpose(1, 2) for x in (a, b, c)]
            if not notes:
                try:
                    return F.scaled_dot_product_attention(*t, is_causal=True, enable_gqa=True).transpose(1, 2)
                except RuntimeError as e:
                    notes.append(f"{name}: kv heads repeated ({type(e).__name__}: {str(e)[:100]})")
            t[1:] = [x.repeat_interleave(HQ // HKV, 1) for x in t[1:]]
            return F.scaled_dot_product_attention(*t, is_causal=True).transpose(1, 2)

    return attn, notes


def bench_backends(T: int, names: list[str], reps: int, warmup: int) -> dict:
    """Causal fwd+bwd (and fwd alone) of each kernel on one device; each checked against the first one."""
    g = torch.Generator(device=DEV).manual_seed(T)
    q, k, v, dout = (torch.randn(1, T, h, D, device=DEV, dtype=DTYPE, generator=g) for h in (HQ, HKV, HKV, HQ))
    row: dict = {"T": T, "notes": []}
    first = None
    for name in names:
        try:
            attn, notes = _kernel_attention(name)
            leaves = [leaf(x) for x in (q, k, v)]
            o = attn(*leaves)
            o.backward(dout)
            got = [o.detach(), *(x.grad for x in leaves)]
            del o
            if first is None:
                first = got
            else:
                row[f"{name}_err"] = max(rel(a, b) for a, b in zip(got, first))
                if row[f"{name}_err"] > TOL:
                    raise RuntimeError(f"differs from {names[0]}: relative error {row[f'{name}_err']:.3g}")
            del got
            step = fwd_bwd(attn, *leaves, dout)
            for _ in range(warmup):
                step()
            row[name] = statistics.median(fenced_ms(step, DEV == "cuda") for _ in range(reps))
            with torch.no_grad():
                row[f"{name}_fwd"] = statistics.median(fenced_ms(lambda f=attn: f(q, k, v), DEV == "cuda")
                                                       for _ in range(reps))
            row["notes"] += notes
            print(f"T={T}: {name} {row[name]:.1f} ms fwd+bwd, {row[f'{name}_fwd']:.1f} ms fwd"
                  + (f" (max rel err vs {names[0]} {row[f'{name}_err']:.1e})" if f"{name}_err" in row else ""),
                  flush=True)
            del leaves, step
        except Exception as e:  # keep the other rows
            row[name] = None
            print(f"T={T}: {name} FAILED: {type(e).__name__}: {str(e)[:300]}", flush=True)
            traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    return row


def report_backends(rows: list[dict], names: list[str], command: str, device: str) -> str:
    label = {n: f"SDPA {SDPA_KERNELS[n].split('_')[0].lower()} (torch)" if n in SDPA_KERNELS else f"ours: {n}"
             for n in names}
    lines = [f"device: 1 × {device}; torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}; "
             f"date {datetime.date.today()}", f"command: `{command}`", "",
             f"Causal attention fwd+bwd (fwd alone in brackets), {str(DTYPE).removeprefix('torch.')}, batch 1, "
             "32 q heads / 8 kv heads, head dim 128; milliseconds (median); ours = the block entry "
             "`dense_attention` (the sp = 1 mixer's path) with "
             f"model.attention_backend = that kernel; goal: ours cudnn ≤ {GOAL_CUDNN_OVER_FLASH} × ours flash.", "",
             "| T | " + " | ".join(label[n] for n in names) + " | cudnn / flash (ours) | goal |",
             "|---|" + "---|" * (len(names) + 2)]
    for r in rows:
        cells = [f"{fmt(r.get(n))} ({fmt(r.get(n + '_fwd'))})" if r.get(n) is not None else "—" for n in names]
        c, f = r.get("cudnn"), r.get("flash")
        ratio_ = "—" if c is None or f is None else f"{c / f:.3f}"
        goal = "—" if ratio_ == "—" else ("met" if c / f <= GOAL_CUDNN_OVER_FLASH else "**unmet**")
        lines.append(f"| {tokens(r['T'])} | " + " | ".join(cells) + f" | {ratio_} | {goal} |")
    lines += ["", f"Max relative L2 error vs {names[0]} (output, dq, dk, dv; bf16): " + "; ".join(
        tokens(r["T"]) + " " + ", ".join(f"{n} {r[n + '_err']:.1e}" for n in names if n + "_err" in r) for r in rows)]
    notes = sorted({n for r in rows for n in r["notes"]})
    if notes:
        lines.append("notes: " + "; ".join(notes))
    return "\n".join(lines) + "\n"


def main_backends(args) -> None:
    """--backends: one device, no process group."""
    global DEV, DTYPE
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
    names = [n for n in args.backends.split(",") if n]
    if DEV == "cuda":
        names += [n for n in SDPA_KERNELS if args.sdpa_anchors and n not in names]
    command = "python benchmarks/sp_attention.py " + " ".join(sys.argv[1:])
    device = torch.cuda.get_device_name() if DEV == "cuda" else "CPU"
    rows = []
    for T in (int(x) for x in args.seq_lens.split(",") if x):
        rows.append(bench_backends(T, names, args.reps, args.warmup))
        text = report_backends(rows, names, command, device)
        if args.out:  # the report so far: a run stopped by a time limit keeps it
            Path(args.out).write_text(text)
    print("\n" + text, flush=True)


def _set_rotate_method(name: str) -> None:
    try:
        from torch.distributed.tensor.experimental._attention import set_rotate_method
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import set_rotate_method
    set_rotate_method(name)


def _torch_cp(q, k, v, dout, ref_local, rotate: str, reps: int, warmup: int, mesh) -> tuple[float, float, str]:
    """torch.distributed.tensor.experimental.context_parallel: SDPA (flash) on [B, H, T, D] buffers it shards
    itself (head-tail load balancing = the zigzag split)."""
    import torch.nn.functional as F
    from torch.distributed.tensor.experimental import context_parallel
    from torch.nn.attention import SDPBackend, sdpa_kernel

    _set_rotate_method(rotate)
    note = ""
    for gqa in (True, False):
        kv_rep = 1 if gqa else HQ // HKV
        bufs = [q.transpose(1, 2).contiguous(), k.repeat_interleave(kv_rep, 2).transpose(1, 2).contiguous(),
                v.repeat_interleave(kv_rep, 2).transpose(1, 2).contiguous(), dout.transpose(1, 2).contiguous()]
        try:
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), context_parallel(
                    mesh, buffers=bufs, buffer_seq_dims=[2, 2, 2, 2], no_restore_buffers=set(bufs)):
                ql, kl, vl = leaf(bufs[0]), leaf(bufs[1]), leaf(bufs[2])

                def attn(a, b, c, gqa=gqa):
                    return F.scaled_dot_product_attention(a, b, c, is_causal=True, enable_gqa=gqa)

                step = fwd_bwd(attn, ql, kl, vl, bufs[3])
                o = attn(ql, kl, vl)
                o.backward(bufs[3])
                o = o.detach().transpose(1, 2)
                dk, dv = kl.grad.transpose(1, 2), vl.grad.transpose(1, 2)
                if not gqa:  # sum the gradients of the repeated kv heads
                    dk = dk.unflatten(2, (HKV, kv_rep)).sum(3)
                    dv = dv.unflatten(2, (HKV, kv_rep)).sum(3)
                err = max(rel(o, ref_local["o"]), rel(ql.grad.transpose(1, 2), ref_local["q"]),
                          rel(dk, ref_local["k"]), rel(dv, ref_local["v"]))
                errs = torch.tensor([err], device=DEV)
                dist.all_reduce(errs, op=dist.ReduceOp.MAX)
                ms = timed(step, reps, warmup)
            return ms, errs.item(), note
        except Exception as e:
            if not gqa:
                raise
            note = f"; kv heads repeated to {HQ} (enable_gqa failed: {type(e).__name__}: {str(e)[:120]})"
    raise AssertionError("unreachable")


def bench_lasp2(tokens: int, reps: int, warmup: int, profile: bool = False) -> dict:
    """LASP-2 weak scaling: `tokens` per GPU on all ranks vs `tokens` on one GPU."""
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank must create every group
    single = singles[rank]
    log_decay = retnet_log_decay(LASP_H).to(DEV)

    def inputs(T: int, seed: int):
        g = torch.Generator(device=DEV).manual_seed(seed)
        return [torch.randn(1, T, LASP_H, LASP_K, device=DEV, dtype=DTYPE, generator=g)
                for _ in range(4)]

    # correctness at a smaller size: the sp result against one GPU on the whole sequence
    T_check = 32768 if DEV == "cuda" else 256
    q, k, v, do = (leaf(x) for x in inputs(T_check * world, 7))
    ref = lasp2_linear_attention(q, k, v, log_decay=log_decay, group=single)
    ref_grads = torch.autograd.grad(ref, (q, k, v), do)
    local = [leaf(shard_sequence(x.detach(), rank, world, "zigzag").contiguous()) for x in (q, k, v)]
    o = lasp2_linear_attention(*local, log_decay=log_decay, group=dist.group.WORLD, layout="zigzag")
    grads = torch.autograd.grad(o, local, shard_sequence(do, rank, world, "zigzag").contiguous())
    errs = [rel(o, shard_sequence(ref, rank, world, "zigzag"))]
    errs += [rel(g, shard_sequence(r, rank, world, "zigzag")) for g, r in zip(grads, ref_grads)]
    err = torch.tensor([max(errs)], device=DEV)  # output and dq, dk, dv
    dist.all_reduce(err, op=dist.ReduceOp.MAX)
    if err.item() > TOL:
        raise RuntimeError(f"LASP-2 differs from one GPU: relative error {err.item():.3g}")

    out = {"tokens": tokens, "err": err.item()}
    q, k, v, do = inputs(tokens, 11 + rank)
    q, k, v = leaf(q), leaf(k), leaf(v)
    steps = {}
    for name, group, layout in (("1gpu", single, "contiguous"), ("sp", dist.group.WORLD, "zigzag")):
        def attn(a, b, c, group=group, layout=layout):
            return lasp2_linear_attention(a, b, c, log_decay=log_decay, group=group, layout=layout)

        steps[name] = fwd_bwd(attn, q, k, v, do)
        timed(steps[name], 1, warmup)  # compile and warm up
    # the two paths alternate, so clock drift under sustained load favours neither
    times = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            times[name].append(timed(step, 1, 0))
    out.update({name: statistics.median(t) for name, t in times.items()})
    if profile:  # GPU kernels of 3 steps, by self CUDA time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as prof

        for name, step in steps.items():
            with prof(activities=[ProfilerActivity.CUDA]) as pr:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            log(f"== LASP-2 profile: {name}, 3 steps")
            log(pr.key_averages().table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=60))
    out["eff"] = out["1gpu"] / out["sp"]
    log(f"LASP-2 {tokens} tokens/GPU: 1 GPU {out['1gpu']:.2f} ms, {world} GPUs {out['sp']:.2f} ms, "
        f"efficiency {out['eff']:.3f} (check err {out['err']:.2e})")
    return out


def tokens(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}×"


def softmax_table(rows: list[dict], world: int) -> list[str]:
    """The softmax rows: milliseconds per method, speed-ups over one GPU and over torch CP, errors, CP notes."""
    kernel = "/".join(sorted({r.get("kernel", "?") for r in rows})) or "—"
    lines = ["",
             "Causal attention fwd+bwd, bf16, batch 1, 32 q heads / 8 kv heads, head dim 128, zigzag; "
             f"milliseconds (median); block kernel {kernel} (1 GPU and every method; torch CP: SDPA flash); "
             f"speed-up = 1-GPU time / {world}-GPU time; vs CP = best torch context_parallel time / ours.", "",
             f"| T | 1 GPU ({kernel}) | ring | allgather | ulysses | torch CP allgather | torch CP alltoall "
             "| ring speed-up | allgather speed-up | ulysses speed-up | ring vs CP | allgather vs CP |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cps = [r.get(f"cp_{x}") for x in ("allgather", "alltoall") if r.get(f"cp_{x}") is not None]
        cp = min(cps) if cps else None
        lines.append(
            f"| {tokens(r['T'])} | {fmt(r['1gpu'])} | {fmt(r.get('ring'))} | {fmt(r.get('allgather'))} "
            f"| {fmt(r.get('ulysses'))} | {fmt(r.get('cp_allgather'))} | {fmt(r.get('cp_alltoall'))} "
            f"| {ratio(r['1gpu'], r.get('ring'))} | {ratio(r['1gpu'], r.get('allgather'))} "
            f"| {ratio(r['1gpu'], r.get('ulysses'))} | {ratio(cp, r.get('ring'))} | {ratio(cp, r.get('allgather'))} |")
    lines += ["", "Max relative L2 error vs 1 GPU (output, dq, dk, dv; bf16): " + "; ".join(
        tokens(r['T']) + " " + ", ".join(f"{m} {r[m + '_err']:.1e}" for m in
                                          (*METHODS, "cp_allgather", "cp_alltoall") if m + "_err" in r)
        for r in rows)]
    notes = {r.get("cp_note") for r in rows if r.get("cp_note")}
    if notes:
        lines.append("torch CP note:" + "".join(notes))
    return lines


def report(rows: list[dict], lasp: dict | None, world: int, command: str, device: str) -> str:
    lines = [f"device: {world} × {device}; torch {torch.__version__}; date {datetime.date.today()}",
             f"command: `{command}`"]
    if rows:  # softmax lengths asked (--seq-lens); a LASP-2-only run has no table
        lines += softmax_table(rows, world)
    if lasp is not None:
        lines += ["", f"LASP-2 weak scaling (H={LASP_H}, K=V={LASP_K}, bf16, RetNet decay, backend auto, fwd+bwd): "
                      f"{tokens(lasp['tokens'])} tokens on 1 GPU {lasp['1gpu']:.2f} ms, "
                      f"{tokens(lasp['tokens'])} tokens/GPU on {world} GPUs {lasp['sp']:.2f} ms, "
                      f"efficiency t1/t{world} = {lasp['eff']:.3f} "
                      f"(check vs 1 GPU, o/dq/dk/dv: max rel err {lasp['err']:.1e})"]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-lens", default="32768,131072,262144")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (3 at ≥ 256K tokens)")
    p.add_argument("--warmup", type=int, default=0,
                   help="untimed runs besides the verification run, which always precedes timing")
    p.add_argument("--cp-rotations", default="allgather,alltoall",
                   help="torch context_parallel kv rotations to time ('' to skip torch CP)")
    p.add_argument("--profile-lasp", action="store_true", help="print a CUDA-time profile of one LASP-2 step")
    p.add_argument("--lasp-tokens", type=int, default=524288, help="tokens per GPU for LASP-2 (0: skip)")
    p.add_argument("--out", help="also write the markdown report here")
    p.add_argument("--smoke", action="store_true", help="dry run on CPU (gloo, fp32) with small --seq-lens")
    p.add_argument("--backend", default="auto", choices=ATTENTION_BACKENDS,
                   help="torchrun mode: the block kernel of the 1-GPU row and every sp method")
    p.add_argument("--backends", default="",
                   help="one device, no torchrun: compare these kernels (e.g. cudnn,flash) on the block entry")
    p.add_argument("--no-sdpa-anchors", dest="sdpa_anchors", action="store_false",
                   help="--backends: skip torch SDPA pinned to its cuDNN and flash kernels")
    args = p.parse_args()
    if args.backends:
        return main_backends(args)
    global DEV, DTYPE
    if args.smoke:
        DEV, DTYPE = "cpu", torch.float32
        dist.init_process_group("gloo")
    else:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    world = dist.get_world_size()
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(DEV, (world,))
    command = "torchrun --nproc-per-node {} benchmarks/sp_attention.py {}".format(world, " ".join(sys.argv[1:]))
    t0 = time.time()
    rows, lasp, failed = [], None, set()
    if args.lasp_tokens:
        try:
            lasp = bench_lasp2(args.lasp_tokens, 10, 2, args.profile_lasp)
        except Exception as e:
            log(f"LASP-2 FAILED: {type(e).__name__}: {str(e)[:300]}")
            if dist.get_rank() == 0:
                traceback.print_exc()
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for T in (int(x) for x in args.seq_lens.split(",") if x):
        reps = 3 if T >= 262144 else args.reps
        rows.append(bench_attention(T, reps, args.warmup, args.methods.split(","),
                                    [x for x in args.cp_rotations.split(",") if x], mesh, failed, args.backend))
        if DEV == "cuda":
            torch.cuda.empty_cache()
        if args.out and dist.get_rank() == 0:  # the report so far: a run stopped by a time limit keeps it
            Path(args.out).write_text(report(rows, lasp, world, command, torch.cuda.get_device_name()
                                             if DEV == "cuda" else "CPU"))
    text = report(rows, lasp, world, command, torch.cuda.get_device_name() if DEV == "cuda" else "CPU")
    log(text + f"\n(total {time.time() - t0:.0f} s)")
    if args.out and dist.get_rank() == 0:
        Path(args.out).write_text(text)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
