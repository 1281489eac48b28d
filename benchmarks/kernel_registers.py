"""Registers, spills and shared memory of the project's Triton kernels, compiled ahead of time (no GPU needed).

    python benchmarks/kernel_registers.py [--op delta_rule|linear_attention|conv] [--arch 80|90|100]
        [--batch 1] [--heads 16] [--seq-len 65536] [--head-dim 128] [--dtype bf16] [--decay none|const|gate]
        [--state] [--set FIELD=VALUE ...] [--sweep FIELD=V1,V2,... ...] [--kernels NAME,...]
        [--ptxas auto|triton|PATH] [--jobs N]

How: the op's launchers run forward and backward on meta tensors under a stand-in Triton driver that names the
target, and Triton's `jit_cache_hook` records each `kernel[grid](...)` launch as Triton would compile it (signature,
argument specialization, constexprs, num_warps, num_stages) and skips it. So the launch parameters come from the
project's own launch code (`--set` / `--sweep` change the op's config: DeltaConfig, TritonConfig or ConvConfig);
the one device test there, `kernels.triton.backward._pipeline_hints`, is answered as on an NVIDIA GPU. Each distinct
launch is then compiled with `triton.compile` for the target, and ptxas's -v report gives one row per kernel:
registers per thread, spill stores / loads and stack frame (local memory) in bytes per thread, shared memory (the
dynamic allocation Triton launches with), num_warps, num_stages, and notes (wgmma serialized by ptxas, shared memory
over the target's limit). A kernel launched with different constexpr flags (modes) gets one row per variant (delta
rule: `_sweep_kernel` MODE 0 OUT, 1 STATES, 2 SUM_M, 3 SUM_P; `_bwd_sweep_kernel` MODE 0 DELTA, 1 FULL).
--kernels keeps the kernels whose names contain one of its comma-separated substrings.

Inputs follow the models: q, k, v in --dtype, β and the gate fp32 (models/gated_deltanet.py, models/llama.py);
--decay defaults to the per-token gate for the delta rule (Gated DeltaNet) and the per-head constant λ for linear
attention (Linear-Llama's retnet decay); --state adds an initial and a final state (a conv halo): windowed training.
The conv's channels are 3 · heads · head_dim (q, k, v), its width --width. The delta rule takes its chunk from
DeltaConfig.chunk here; the model passes ModelConfig.chunk_size (64), which overrides it.
--set / --sweep also take maxnreg=N (0: none), a compile option that no launcher passes today: what ptxas makes of
a kernel under a register cap (a launch would pass maxnreg=N). --sweep tabulates every combination of the values
given, then, per kernel, the configurations with the fewest spill bytes (ties: fewest registers) and the
configurations with no spill in any kernel (or the fewest spill bytes).

Indicative only: the H200 runs Triton 3.6, which assembles sm_90 with its bundled CUDA 12 ptxas; the installed
Triton (3.9 here) generates the PTX. --ptxas auto (default) assembles as Triton 3.6 would choose, with the bundled
CUDA 12 `ptxas` below sm_100 and `ptxas-blackwell` from sm_100; --ptxas triton lets the installed Triton choose
(3.9: CUDA 13 `ptxas-blackwell` from sm_90); a path names a ptxas. One ptxas per process.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.6's behaviour; silences 3.9's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime import driver  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OPS = ("delta_rule", "linear_attention", "conv")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SMEM_LIMIT = {80: 166912, 90: 232448, 100: 232448}  # bytes of shared memory one block may opt in to
#: compile options that no launcher passes today: --set / --sweep may add them to every launch (what-if)
LAUNCH_OPTIONS = {"maxnreg": int}
COLUMNS = ("kernel", "regs", "spill st", "spill ld", "stack", "smem", "warps", "stages", "notes")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int = 1
    heads: int = 16
    seq_len: int = 65536
    head_dim: int = 128
    dtype: str = "bf16"
    decay: str | None = None  # None: the op's model default
    state: bool = False
    width: int = 4


@dataclasses.dataclass
class Launch:
    """One kernel specialization as Triton would compile it for a launch."""

    fn: object  # the JITFunction
    signature: dict
    constants: dict
    attrs: dict
    options: dict
    spec: str  # Triton's specialization data (JSON): identifies the compilation

    @property
    def name(self) -> str:
        return self.fn.fn.__name__

    def constexprs(self) -> dict[str, object]:
        """The declared constexpr parameters and their values."""
        out = {}
        for path, val in self.constants.items():
            p = self.fn.params[path[0]]
            if len(path) == 1 and p.is_constexpr:
                out[p.name] = val
        return out


# ----------------------------------------------------------------------------------------------------
# capture: run the op's launchers on meta tensors, record every launch
# ----------------------------------------------------------------------------------------------------


class _TargetDriver:
    """Stands in for the CUDA driver: what `JITFunction.run` asks before compiling (device, stream, target)."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_device(self) -> str:
        return f"aot-{self.target.backend}-{self.target.arch}"  # one binder (hence options) per target

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")


@contextlib.contextmanager
def capturing(target: GPUTarget) -> Iterator[list[Launch]]:
    """Within the block, `kernel[grid](...)` records a Launch (once per specialization) and launches nothing."""
    import kernels.triton.backward as la_bwd

    launches: list[Launch] = []
    seen: set[str] = set()

    def hook(*, key, repr, fn, compile, is_manual_warmup, already_compiled) -> bool:
        spec = compile["specialization_data"]
        if spec not in seen:
            seen.add(spec)
            opts = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(spec)["options"].items()}
            launches.append(Launch(fn.jit_function, compile["signature"], compile["constants"],
                                   compile["configs"][0], opts, spec))
        return True  # skip the compilation: `run` returns before launching

    saved_hook, saved_hints, saved_driver = knobs.runtime.jit_cache_hook, la_bwd._pipeline_hints, driver._active
    driver.set_active(_TargetDriver(target))
    knobs.runtime.jit_cache_hook = hook
    la_bwd._pipeline_hints = lambda device: target.backend == "cuda"
    try:
        yield launches
    finally:
        knobs.runtime.jit_cache_hook = saved_hook
        la_bwd._pipeline_hints = saved_hints
        driver.set_active(saved_driver)  # (not reset_active: without a GPU there is no default driver)


def _leaf(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=dtype).requires_grad_()


def run_delta_rule(s: Shape, cfg) -> None:
    """Forward and backward of `delta_rule_triton` (Gated DeltaNet's call) with config cfg."""
    from kernels.delta_rule.triton import delta_rule_triton

    B, T, H, D, dt = s.batch, s.seq_len, s.heads, s.head_dim, DTYPES[s.dtype]
    q, k, v = (_leaf(B, T, H, D, dtype=dt) for _ in range(3))
    beta = _leaf(B, T, H, dtype=torch.float32)
    decay = s.decay or "gate"
    kw = {"gate": _leaf(B, T, H, dtype=torch.float32)} if decay == "gate" else {}
    if decay == "const":
        kw["log_decay"] = torch.full((H,), -0.1, device="meta")
    init = _leaf(B, H, D, D, dtype=torch.float32) if s.state else None
    o, final = delta_rule_triton(q, k, v, beta, initial_state=init, output_final_state=s.state, config=cfg, **kw)
    (o.float().sum() + (final.sum() if final is not None else 0)).backward()


def run_linear_attention(s: Shape, cfg) -> None:
    """Forward and backward of `linear_attention_triton` (Linear-Llama's call) with config cfg."""
    from kernels.triton import linear_attention_triton

    B, T, H, D, dt = s.batch, s.seq_len, s.heads, s.head_dim, DTYPES[s.dtype]
    q, k, v = (_leaf(B, T, H, D, dtype=dt) for _ in range(3))
    decay = s.decay or "const"
    kw = {"log_decay": torch.full((H,), -0.1, device="meta")} if decay != "none" else {}
    if decay == "gate":
        kw["gate"] = _leaf(B, T, H, dtype=torch.float32)
    init = _leaf(B, H, D, D, dtype=torch.float32) if s.state else None
    o, final = linear_attention_triton(q, k, v, initial_state=init, output_final_state=s.state, config=cfg, **kw)
    (o.float().sum() + (final.sum() if final is not None else 0)).backward()


def run_conv(s: Shape, cfg) -> None:
    """`short_conv_fwd` and `short_conv_bwd` (ShortConv of q, k, v: 3 · heads · head_dim channels) with cfg."""
    from kernels.conv.triton_conv import short_conv_bwd, short_conv_fwd

    B, T, C, dt = s.batch, s.seq_len, 3 * s.heads * s.head_dim, DTYPES[s.dtype]
    x = torch.empty(B, T, C, device="meta", dtype=dt)
    w = torch.empty(C, s.width, device="meta", dtype=torch.float32)
    halo = torch.empty(B, s.width - 1, C, device="meta", dtype=dt) if s.state else None
    y = short_conv_fwd(x, w, halo, True, cfg)
    short_conv_bwd(torch.empty_like(y), x, w, halo, True, cfg)


RUNNERS: dict[str, Callable[[Shape, object], None]] = {
    "delta_rule": run_delta_rule, "linear_attention": run_linear_attention, "conv": run_conv}


def default_config(op: str):
    """The op's config as a call that passes none would use it (read at call time)."""
    if op == "delta_rule":
        from kernels.delta_rule.triton import common
    elif op == "linear_attention":
        from kernels.triton import common
    else:
        from kernels.conv import triton_conv

        return triton_conv.CONFIG
    return common.DEFAULT_CONFIG


def capture(op: str, shape: Shape, cfg, target: GPUTarget, opts: dict | None = None) -> list[Launch]:
    """Every distinct kernel specialization that the op's forward and backward launch (with opts added)."""
    with capturing(target) as launches:
        RUNNERS[op](shape, cfg)
    for la in launches if opts else []:
        la.options = {**la.options, **opts}
        la.spec += json.dumps(opts, sort_keys=True)
    return launches


# ----------------------------------------------------------------------------------------------------
# compile and read ptxas's report
# ----------------------------------------------------------------------------------------------------


def select_ptxas(choice: str, arch: int) -> str:
    """Point Triton at the ptxas of `choice` (see the module docstring); returns 'path (CUDA version)'."""
    from triton.backends.nvidia import compiler as nv

    if choice == "auto":
        if arch < 100 and "TRITON_PTXAS_BLACKWELL_PATH" not in os.environ:
            os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = knobs.nvidia.ptxas.path  # Triton ≥ 3.7 asks for it at sm_90
    elif choice != "triton":
        os.environ["TRITON_PTXAS_PATH"] = os.environ["TRITON_PTXAS_BLACKWELL_PATH"] = choice
    nv.get_ptxas_version.cache_clear()
    tool = nv.get_ptxas(arch)
    return f"{tool.path} (CUDA {tool.version})"


def parse_ptxas_log(log: str, name: str) -> dict[str, object]:
    """regs, spill stores / loads and stack frame (bytes) and notes of entry `name` in a `ptxas -v` log."""
    part = log.split(f"Function properties for {name}", 1)[-1]
    regs = re.search(r"Used (\d+) registers", part)
    frame = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", part)
    if regs is None or frame is None:
        raise RuntimeError(f"no resource usage for {name} in the ptxas log:\n{log}")
    why = re.findall(r"wgmma\.mma_async instructions are serialized due to (.+?) for the function", log)
    notes = [f"wgmma serialized: {m}" for m in sorted(set(why))]
    return {"regs": int(regs.group(1)), "spill st": int(frame.group(2)), "spill ld": int(frame.group(3)),
            "stack": int(frame.group(1)), "notes": notes}


def compile_launch(launch: Launch, target: GPUTarget) -> dict[str, object]:
    """Compile one launch for the target and read ptxas's report (a cache hit reassembles the PTX for it)."""
    src = ASTSource(launch.fn, launch.signature, launch.constants, launch.attrs)
    out = io.StringIO()
    with knobs.nvidia.scope(), contextlib.redirect_stdout(out):
        knobs.nvidia.dump_ptxas_log = True
        kernel = triton.compile(src, target=target, options=launch.options)
        if "Function properties" not in out.getvalue():  # a cache hit: ptxas did not run
            backend = make_backend(target)
            backend.make_cubin(kernel.asm["ptx"], {}, backend.parse_options(launch.options), target.arch)
    md = kernel.metadata
    row = {"kernel": launch.name, **parse_ptxas_log(out.getvalue(), md.name), "smem": md.shared,
           "warps": md.num_warps, "stages": md.num_stages}
    if md.shared > SMEM_LIMIT.get(target.arch, md.shared):
        row["notes"].append(f"smem over the sm_{target.arch} limit ({SMEM_LIMIT[target.arch]}): launch fails")
    return row


_JOBS: tuple[list[Launch], GPUTarget] | None = None  # what forked workers compile (JITFunctions do not pickle)


def _compile_index(i: int) -> dict[str, object]:
    launches, target = _JOBS
    try:
        return compile_launch(launches[i], target)
    except Exception as e:  # one failing specialization must not end a sweep
        msg = str(e).strip().splitlines()
        return {"kernel": launches[i].name, "notes": [f"compile error: {msg[0] if msg else type(e).__name__}"]}


def compile_all(launches: list[Launch], target: GPUTarget, jobs: int = 1) -> list[dict[str, object]]:
    """compile_launch of every launch, in order (jobs > 1: that many forked processes)."""
    global _JOBS
    _JOBS = (launches, target)
    if jobs <= 1 or len(launches) <= 1:
        return [_compile_index(i) for i in range(len(launches))]
    with multiprocessing.get_context("fork").Pool(min(jobs, len(launches))) as pool:
        return pool.map(_compile_index, range(len(launches)), chunksize=1)


# ----------------------------------------------------------------------------------------------------
# configs, labels, tables
# ----------------------------------------------------------------------------------------------------


def parse_value(cfg, field: str, text: str):
    """text as the type of cfg's field (bool: true/false/1/0) or of a LAUNCH_OPTIONS entry."""
    if field in LAUNCH_OPTIONS:
        return LAUNCH_OPTIONS[field](text)
    if field not in {f.name for f in dataclasses.fields(cfg)}:
        names = ", ".join(f.name for f in dataclasses.fields(cfg))
        raise SystemExit(f"{type(cfg).__name__} has no field {field!r}; fields: {names}, {', '.join(LAUNCH_OPTIONS)}")
    cur = getattr(cfg, field)
    if isinstance(cur, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"{field}={text!r}: type true or false")
        return text.lower() in ("true", "1")
    return type(cur)(text)


def configs(base, sets: list[str], sweeps: list[str]) -> list[tuple[dict, object, dict]]:
    """(swept values, config, launch options) of every combination: base with the --set fields replaced, then each
    --sweep point's (a launch option of 0 is left out)."""
    fixed = {k: parse_value(base, k, v) for k, _, v in (item.partition("=") for item in sets)}
    axes = [[(k, parse_value(base, k, v)) for v in vals.split(",") if v]
            for k, _, vals in (item.partition("=") for item in sweeps)]
    out = []
    for combo in itertools.product(*axes):
        kw = {**fixed, **dict(combo)}
        opts = {k: v for k, v in kw.items() if k in LAUNCH_OPTIONS and v}
        out.append((dict(combo), dataclasses.replace(base, **{k: v for k, v in kw.items() if k not in LAUNCH_OPTIONS}),
                    opts))
    return out


def role_params(per_config: list[list[Launch]]) -> dict[str, list[str]]:
    """Per kernel, the constexprs that tell apart its launches within one config (its modes and flags)."""
    roles: dict[str, list[str]] = {}
    for launches in per_config:
        by_name: dict[str, list[dict]] = {}
        for la in launches:
            by_name.setdefault(la.name, []).append(la.constexprs())
        for name, cs in by_name.items():
            names = roles.setdefault(name, [])
            for p in cs[0]:
                if p not in names and len({repr(c.get(p)) for c in cs}) > 1:
                    names.append(p)
    return roles


def label(la: Launch, roles: dict[str, list[str]]) -> str:
    ce = la.constexprs()
    flags = ",".join(f"{p}={ce[p]}" for p in roles.get(la.name, []) if p in ce)
    return f"{la.name}[{flags}]" if flags else la.name


def spill_bytes(row: dict) -> float:
    return row["spill st"] + row["spill ld"] if "regs" in row else float("inf")


def fmt_row(cells: list[object]) -> str:
    return "| " + " | ".join("" if c is None else str(c) for c in cells) + " |"


def table(rows: list[dict], keys: list[str]) -> list[str]:
    """Markdown table: the swept fields (keys), then COLUMNS."""
    head = [*keys, *COLUMNS]
    lines = [fmt_row(head), fmt_row(["---"] * len(head))]
    for r in rows:
        lines.append(fmt_row([*(r["config"][k] for k in keys), *(
            "; ".join(r.get(c, [])) if c == "notes" else r.get(c, "—") for c in COLUMNS)]))
    return lines


def summary(rows: list[dict], keys: list[str]) -> list[str]:
    """Per kernel, the configs with the fewest spill bytes (then registers); configs without spills anywhere."""
    cfg_str = lambda c: ",".join(f"{k}={c[k]}" for k in keys)  # noqa: E731
    out = ["", "Fewest spills per kernel (spill stores + loads, bytes per thread; ties: fewest registers):", ""]
    for name in dict.fromkeys(r["kernel"] for r in rows):
        mine = [r for r in rows if r["kernel"] == name and "regs" in r]
        if not mine:
            out.append(f"- {name}: no configuration compiled")
            continue
        best = min((spill_bytes(r), r["regs"]) for r in mine)
        hits = [r for r in mine if (spill_bytes(r), r["regs"]) == best]
        shown = "; ".join(cfg_str(r["config"]) for r in hits[:4])
        shown += f"; … ({len(hits)} in all)" if len(hits) > 4 else ""
        out.append(f"- {name}: {best[0]} B spilled, {best[1]} regs at {shown}")
    per_cfg: dict[str, float] = {}
    for r in rows:
        per_cfg[cfg_str(r["config"])] = per_cfg.get(cfg_str(r["config"]), 0) + spill_bytes(r)
    clean = [c for c, b in per_cfg.items() if b == 0]
    if clean:
        out += ["", f"No spill in any kernel: {'; '.join(clean)}"]
    else:
        least = min(per_cfg.values())
        out += ["", f"No configuration is free of spills; the fewest in all ({least} B): "
                    f"{'; '.join(c for c, b in per_cfg.items() if b == least)}"]
    return out


# ----------------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--op", choices=OPS, default="delta_rule")
    p.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90, help="sm_XX (default %(default)s: H200)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=65536, help="T (default %(default)s: several segments)")
    p.add_argument("--head-dim", type=int, default=128, help="K = V (default %(default)s: gdn-1b)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="q, k, v (conv: x)")
    p.add_argument("--decay", choices=("none", "const", "gate"), default=None,
                   help="default: gate (delta_rule), const (linear_attention)")
    p.add_argument("--state", action="store_true", help="initial and final state (conv: a halo)")
    p.add_argument("--width", type=int, default=4, help="conv taps (default %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a config field")
    p.add_argument("--sweep", action="append", default=[], metavar="FIELD=V1,V2", help="tabulate over values")
    p.add_argument("--kernels", default="", help="comma-separated name substrings: compile only these")
    p.add_argument("--ptxas", default="auto", help="auto | triton | PATH (module docstring)")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes (default %(default)s)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    ptxas = select_ptxas(a.ptxas, a.arch)
    target = GPUTarget("cuda", a.arch, 32)
    shape = Shape(a.batch, a.heads, a.seq_len, a.head_dim, a.dtype, a.decay, a.state, a.width)
    keys = [s.partition("=")[0] for s in a.sweep]
    points = configs(default_config(a.op), a.set, a.sweep)
    wanted = [k for k in a.kernels.split(",") if k]
    keep = lambda la: not wanted or any(k in la.name for k in wanted)  # noqa: E731
    per_config = [[la for la in capture(a.op, shape, cfg, target, opts) if keep(la)] for _, cfg, opts in points]
    roles = role_params(per_config)
    unique = list({la.spec: la for launches in per_config for la in launches}.values())
    print(f"{a.op} on sm_{a.arch}: triton {triton.__version__}, ptxas {ptxas}; {shape}")
    print(f"config: {points[0][1] if not a.sweep else f'{len(points)} points'}{'; ' if a.set else ''}{' '.join(a.set)}",
          flush=True)
    t0 = time.perf_counter()
    compiled = dict(zip((la.spec for la in unique), compile_all(unique, target, a.jobs)))
    print(f"{len(unique)} kernel specializations compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    rows = [{**compiled[la.spec], "kernel": label(la, roles), "config": swept}
            for (swept, _, _), launches in zip(points, per_config) for la in launches]
    print("\n".join(table(rows, keys)))
    if a.sweep:
        print("\n".join(summary(rows, keys)))


if __name__ == "__main__":
    main()
