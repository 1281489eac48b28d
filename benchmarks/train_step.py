"""Benchmark: the steady-state training step of a 1B linear-attention model, batch 1, one GPU (DESIGN §8, §9).

    python benchmarks/train_step.py [--seq-lens 4Kx32,32K,128K,256K,512K,1M] [--only longtrain|fla]
        [--variant NAME[@LEN+LEN]:KEY=V,KEY=V ...] [--set KEY=VALUE ...] [--steps-check 20] [--out FILE]
        [--profile DIR] [--memory DIR]

A length may carry a batch (`4Kx32`: 32 sequences of 4096 tokens per step, both impls; default 1); a variant
may carry its own lengths (`win16k@128K+1M+4M:train.window=16384` runs only those).

Rows, each impl in a fresh worker process (an OOM, crash or hang cannot poison the next row):
- `longtrain[NAME]`: our `1b` preset (gate on) through the real `Trainer` (pp = sp = dp = 1, one micro-batch,
  remat always, `synthetic:zipf` data: every token a target, a loss that falls), timing `trainer.step(i)`.
  `--set` pairs go to every variant, `--variant` pairs to that variant only (later keys win).
- `fla-retnet`: flash-linear-attention 0.6.0's `RetNetForCausalLM` of the same shape (hidden 2048, 16 layers,
  16 heads, expand_k = expand_v = 1, SwiGLU 6144, vocab 32000, tied embeddings, fused linear cross-entropy,
  fla's other defaults), HF gradient checkpointing, fp32 master weights + bf16 autocast, fused AdamW,
  random token ids as inputs and labels. One warm-up step at the smallest length (Triton autotuning,
  minutes; kept in Triton's cache dir with TRITON_CACHE_AUTOTUNING=1, so a later run there skips it) runs before
  anything is timed. `--fla-model` (default: from the preset's layout) picks the anchor:
  `retnet` for L layers; `gated_deltanet` (`fla-gdn`, for `gdn-1b`: GatedDeltaNetForCausalLM, head dim 128,
  16 heads, expand_v 1, output gate, short conv 4, SwiGLU 6144, fla's softmax attention (8 KV heads) at the
  preset's A positions; its Hopper guard of issue #640 is switched off to time it, as benchmarks/delta_rule.py
  does, and said so); `mamba2` (`fla-mamba2`, for `mamba2-1b`: Mamba2ForCausalLM, state 128, head dim 64,
  expand 2, 1 group, conv 4; fla's Mamba-2 blocks have no MLP, so its layer count is chosen to match our
  parameter count: 37 layers, 1.002 × ours). fla's softmax layers need the flash-attn package: where it is
  missing, compare the pure layouts (`--preset gdn-1b --set model.layout=D`: 1006.6M parameters on both
  sides). fla's Mamba-2 runs mamba_ssm's Triton kernels when that package is installed (benchmarks/wheels.py
  builds a wheel of them), else its naive PyTorch path; without the causal_conv1d CUDA extension (source only) its
  fused training kernel cannot run, and the script keeps fla's Mamba-2 mixers (only them) in eval mode so that
  they take fla's unfused fast path (fla's Triton conv, mamba_ssm's Triton SSD scan); the output says which.
Per row: W warm-up steps (the first one's loss must be finite), then N timed steps with
`torch.cuda.synchronize()` around each; ms/step = the median; tokens/s = T / median; peak =
`torch.cuda.max_memory_allocated` since a reset before the row's first step; MFU (ours) =
`runtime.metrics.flops_per_token` of our config of that size × tokens/s ÷ `peak_flops` (one formula for both
rows); MFU (6N) = 6 · (the impl's own parameters, tied counted once) × tokens/s ÷ peak. After an OOM or a
timeout, the larger T of that variant are recorded as skipped. Rows are appended to
benchmarks/results/train_step.json (other runs' rows kept); the markdown table goes to stdout.
`--steps-check N`: the first variant's row at its first length runs N steps in all (timed after the warm-up)
and records every loss, to show the loss falling.

The issue's table, on one H200 with the wheels of .whl (`python benchmarks/wheels.py` builds them):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 benchmarks/train_step.py --seq-lens 32K,128K,256K,512K,1M --steps-check 20

The hybrid `1b` (LLLA) on each softmax-attention kernel (issue 24; `benchmarks/issue24_gpu.sh` runs it):

    python3 benchmarks/train_step.py --only longtrain --seq-lens 128K --warmup 1 --steps 3 \
        --variant hybrid-cudnn:model.layout=LLLA,model.attention_backend=cudnn \
        --variant hybrid-flash:model.layout=LLLA,model.attention_backend=flash

CPU dry run (tiny model, no memory numbers): python benchmarks/train_step.py --only longtrain --preset tiny
--seq-lens 64,128 --warmup 1 --steps 2 --out /tmp/ts.json
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.config import load_config  # noqa: E402
from runtime.errors import ConfigError  # noqa: E402
from runtime.metrics import flops_per_token, peak_flops  # noqa: E402

PROTO = "@@train_step "  # prefix of the worker's JSON lines on stdout
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "train_step.json"
DEFAULT_SEQ_LENS = "32K,128K,256K,512K,1M"
FLA_MODELS = {"retnet": "fla-retnet", "gated_deltanet": "fla-gdn", "mamba2": "fla-mamba2"}  # --fla-model → label
MISSING = "—"


# -- command line ------------------------------------------------------------------------------------------
def parse_len(s: str) -> int:
    """'32768', '32K', '1M' → tokens (K = 1024)."""
    s = s.strip().upper()
    mult = {"K": 1024, "M": 1024**2}.get(s[-1:], 1)
    return int(s[:-1] if mult > 1 else s) * mult


def parse_lens(spec: str, sep: str = ",") -> dict[int, int]:
    """'4Kx32,32K,1M' → {tokens per sequence: sequences per step} ({4096: 32, 32768: 1, 1048576: 1}), by length."""
    out = {}
    for item in (i.strip() for i in spec.split(sep) if i.strip()):
        length, _, batch = item.upper().partition("X")
        try:
            T, B = parse_len(length), int(batch or 1)
        except ValueError:
            raise SystemExit(f"{item!r}: use a length like 32768, 32K or 1M, optionally xBATCH (4Kx32)") from None
        if T < 1 or B < 1 or out.get(T, B) != B:
            raise SystemExit(f"{item!r}: lengths and batches must be positive, one batch per length")
        out[T] = B
    return dict(sorted(out.items()))


def parse_variant(spec: str) -> tuple[str, list[str], dict[int, int] | None]:
    """'NAME[@LENS]:train.window=8192,parallel.remat=never' → (NAME, ['train.window=8192', ...], lengths): LENS
    ('128K+1M+4M', each optionally xBATCH) replaces --seq-lens for this variant (None: it runs them all)."""
    head, _, kv = spec.partition(":")
    name, _, lens = head.partition("@")
    pairs = [p.strip() for p in kv.split(",") if p.strip()]
    if not name or any("=" not in p for p in pairs) or ("@" in head and not lens.strip()):
        raise SystemExit(f"--variant {spec!r}: use NAME[@LEN+LEN]:section.key=value,section.key=value")
    return name, pairs, parse_lens(lens, "+") if lens.strip() else None


def base_overrides(preset: str) -> list[str]:
    return [f"model.preset={preset}", "model.gate=true", "parallel.pp=1", "parallel.sp=1", "parallel.dp=1",
            "parallel.microbatches=1", "parallel.remat=always", "train.batch_size=1", "run.progress=false",
            "run.tensorboard=false", "data.source=synthetic:zipf"]


def literal(v: str):
    """A --fla-set value: JSON (true, 1.0, null, "s") or else the string itself."""
    try:
        return json.loads(v)
    except ValueError:
        return v


def fla_model_for(layout_kinds: str) -> str:
    """The fla anchor of a layout: its recurrent letter (L, D or M; softmax A layers ride along)."""
    recurrent = set(layout_kinds) - {"A"}
    if len(recurrent) != 1:
        raise SystemExit(f"no fla anchor for a layout of {sorted(recurrent)}; pick one with --fla-model")
    return {"L": "retnet", "D": "gated_deltanet", "M": "mamba2"}[recurrent.pop()]


def fla_fields(m, kind: str) -> dict:
    """Fields of fla's config of `kind` with our model config m's shape (before the Mamba-2 layer count)."""
    common = dict(hidden_size=m.dim, num_hidden_layers=m.n_layers, vocab_size=m.vocab_size,
                  tie_word_embeddings=m.tie_embeddings, fuse_cross_entropy=False, fuse_linear_cross_entropy=True)
    if kind == "retnet":
        return dict(common, num_heads=m.n_heads, expand_k=1.0, expand_v=1.0, intermediate_size=m.ffn_dim)
    if kind == "gated_deltanet":
        softmax = [i for i, k in enumerate(m.layer_kinds()) if k == "A"]
        attn = dict(layers=softmax, num_heads=m.n_heads, num_kv_heads=m.kv_heads, rope_theta=m.rope_theta) \
            if softmax else None
        return dict(common, num_heads=m.n_heads, head_dim=m.head_dim, expand_v=1.0, use_gate=True,
                    use_short_conv=m.short_conv > 1, conv_size=max(m.short_conv, 2), intermediate_size=m.ffn_dim,
                    norm_eps=m.norm_eps, attn=attn)
    if kind == "mamba2":
        return dict(common, state_size=m.ssm_state, head_dim=m.ssm_head_dim, expand=m.ssm_expand,
                    n_groups=m.ssm_groups, conv_kernel=m.short_conv, norm_eps=m.norm_eps)
    raise SystemExit(f"--fla-model {kind!r}: use one of {sorted(FLA_MODELS)}")


def fla_classes(kind: str):
    """(config class, model class) of fla's `kind`."""
    import fla.models as fm

    name = {"retnet": "RetNet", "gated_deltanet": "GatedDeltaNet", "mamba2": "Mamba2"}[kind]
    return getattr(fm, f"{name}Config"), getattr(fm, f"{name}ForCausalLM")


def fla_layers_matching(kind: str, fields: dict, n_params: int) -> int:
    """fla Mamba-2 layers whose model has about n_params parameters (its blocks carry no MLP): counted on
    the meta device from a 1- and a 2-layer build."""
    config, model = fla_classes(kind)
    counts = []
    for layers in (1, 2):
        with torch.device("meta"):
            counts.append(sum(p.numel() for p in model(config(**{**fields, "num_hidden_layers": layers})).parameters()))
    per_layer = counts[1] - counts[0]
    return max(1, round((n_params - (counts[0] - per_layer)) / per_layer))


# -- worker side: one process per impl (and variant), rows in increasing T ------------------------------------
def emit(event: str, **fields) -> None:
    print(PROTO + json.dumps(clean({"event": event, **fields})), file=sys.__stdout__, flush=True)


def clean(x):
    """NaN / inf → None, recursively (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    return x


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def watch_parent() -> None:
    """Exit if the parent dies (a killed benchmark must not leave a worker holding the GPU)."""
    parent = os.getppid()

    def loop() -> None:
        while True:
            time.sleep(2.0)
            if os.getppid() != parent:
                os._exit(3)

    threading.Thread(target=loop, daemon=True).start()


def measure(step_fn: Callable[[int], float], device: torch.device, warmup: int, steps: int,
            total: int | None = None) -> dict:
    """max(warmup, 1) warm-up steps (the first one's loss must be finite), then timed steps up to
    max(warm-up + steps, total); step_fn(i) runs step i and returns its loss as a float."""
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm = max(warmup, 1)
    total = max(warm + steps, total or 0)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(total):
        sync()
        start = time.perf_counter()
        loss = step_fn(i)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(loss)
        if i == 0 and not math.isfinite(loss):
            raise FloatingPointError(f"loss {loss} at the first step (checked before timing)")
    timed = times[warm:]
    med = statistics.median(timed) if timed else math.nan
    return dict(median_s=med, step_ms=[1e3 * t for t in times], losses=losses, timed_from=warm,
                loss_first=losses[warm] if timed else math.nan, loss_last=losses[-1] if timed else math.nan,
                peak_gib=torch.cuda.max_memory_allocated(device) / 2**30 if cuda else math.nan)


def batch_of(job: dict, T: int) -> int:
    """Sequences per step at length T (JSON turned the job's int keys into strings)."""
    return int(job.get("batches", {}).get(str(T), 1))


def stats_row(T: int, B: int, m: dict, flops_tok: float, n_params: int, peak: float) -> dict:
    tps = B * T / m["median_s"]
    return dict(seq_len=T, batch=B, status="ok", tokens_per_s=tps, ms_per_step=1e3 * m["median_s"],
                mfu=tps * flops_tok / peak, mfu_6n=6.0 * n_params * tps / peak, peak_gib=m["peak_gib"],
                loss_first=m["loss_first"], loss_last=m["loss_last"], step_ms=m["step_ms"], n_params=n_params)


def profile_step(step: Callable[[], object], device: torch.device, path: Path) -> None:
    """One more step under torch.profiler: the CUDA kernels by total time (top 60) and, on a GPU, the split by
    kind of work (GEMMs, Triton kernels, eager elementwise, optimizer, communication) → path."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    text = prof.key_averages().table(sort_by=key, row_limit=60, max_name_column_width=90) + "\n"
    if device.type == "cuda":  # where the time went, by kind of work (benchmarks/profile_split.py)
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from profile_split import render, split_table

        text += "\n" + render({path.stem: split_table(text)}) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    print(f"train_step: profile of one step → {path}", file=sys.stderr, flush=True)


def run_rows(job: dict, device: torch.device, row_fn: Callable[[int], dict]) -> None:
    """row_fn(T) for each T in order, an OOM stops the worker (larger T are skipped by the parent)."""
    for T in job["seq_lens"]:
        emit("start", what="row", seq_len=T)
        oom = False
        try:
            row = row_fn(T)
        except Exception as e:  # noqa: BLE001 — every failure becomes the row's status
            oom = is_oom(e)
            row = dict(seq_len=T, status="oom" if oom else f"error: {one_line(e)}")
            if not oom:
                import traceback

                traceback.print_exc()
        free_memory()
        emit("row", **row)
        if oom:
            return


def longtrain_worker(job: dict, device: torch.device) -> None:
    from runtime.mesh import build_mesh
    from runtime.trainer import Trainer

    mesh = build_mesh(1, 1, 1)
    peak = peak_flops(device)

    def row(T: int) -> dict:
        check = job["steps_check"] if T == job["seq_lens"][0] and job["first_is_check"] else 0
        total = max(max(job["warmup"], 1) + job["steps"], check)
        B = batch_of(job, T)
        with tempfile.TemporaryDirectory(prefix="train_step_") as run_dir:
            extra = [k for k in ("profile", "memory") if job.get(k)]  # each one more step after the timed ones
            steps = total + len(extra)
            overrides = [f"train.steps={steps}", *job["overrides"], f"train.batch_size={B}", f"train.seq_len={T}",
                         f"run.dir={run_dir}"]
            cfg = load_config(None, overrides)
            cfg.validate(world_size=1)
            torch.manual_seed(cfg.train.seed)
            live = {"trainer": Trainer(cfg, mesh)}  # dropped before the next row builds its own
            try:
                n = live["trainer"].n_params_total
                m = measure(lambda i: live["trainer"].step(i).loss, device, job["warmup"], job["steps"], check)
                if job.get("profile"):
                    profile_step(lambda: live["trainer"].step(total), device,
                                 Path(job["profile"]) / f"{job['variant']}_{T}.txt")
                if job.get("memory") and device.type == "cuda":
                    sys.path.insert(0, str(Path(__file__).resolve().parent))
                    from memory_peak import record_step

                    path = Path(job["memory"]) / f"{job['variant']}_{T}.md"
                    record_step(lambda: live["trainer"].step(total + len(extra) - 1), path)
                    print(f"train_step: what is alive at one step's peak → {path}", file=sys.stderr, flush=True)
            finally:
                live.clear()
                free_memory()
        out = stats_row(T, B, m, flops_per_token(cfg.model, T, n), n, peak)
        out["overrides"] = overrides[:-1]
        if check:
            out.update(steps_check=check, losses=m["losses"])
        return out

    run_rows(job, device, row)


def fla_worker(job: dict, device: torch.device) -> None:
    # fla's autotuned kernels keep their timings in Triton's cache dir: a later run on the same machine (or one
    # given the same TRITON_CACHE_DIR contents) skips the minutes of autotuning; the timed steps are the same
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    Ts, kind = job["seq_lens"], job["fla_model"]
    label = FLA_MODELS[kind]
    try:
        config_class, model_class = fla_classes(kind)
    except ImportError as e:
        print(f"train_step: fla is not importable ({one_line(e)})", file=sys.stderr, flush=True)
        for T in Ts:
            emit("row", seq_len=T, status="error: fla not installed")
        return
    if device.type != "cuda":
        for T in Ts:
            emit("row", seq_len=T, status="error: fla needs a CUDA device")
        return
    ours = load_config(None, job["overrides"])  # our config of the same size: the MFU formula of both rows
    from runtime.trainer import cfg_param_count

    n_ours, m = cfg_param_count(ours), ours.model
    fields = fla_fields(m, kind)
    fields.update({k: literal(v) for k, v in (p.split("=", 1) for p in job["fla_set"])})
    if kind == "mamba2" and not any(p.startswith("num_hidden_layers=") for p in job["fla_set"]):
        fields["num_hidden_layers"] = fla_layers_matching(kind, fields, n_ours)
    unfused_mamba2 = False  # fla's Mamba-2 mixers kept in eval mode: its unfused fast path (see below)
    if kind == "mamba2":
        import fla.layers.mamba2 as fla_mamba2

        if not fla_mamba2.is_fast_path_available:
            emit("note", text="fla-mamba2 ran its naive PyTorch path: fla 0.6.0's Mamba-2 kernels come from "
                              "mamba_ssm, which is not installed (benchmarks/wheels.py builds its Triton kernels)")
        elif fla_mamba2.causal_conv1d_fn is None:
            # in training mode fla calls mamba_ssm's fused conv+scan+out-projection kernel, whose conv needs the
            # causal_conv1d CUDA extension (source only, compiled with nvcc); out of training mode it runs fla's
            # Triton conv and mamba_ssm's Triton SSD scan (mamba_chunk_scan_combined), both differentiable. The
            # mixers have no dropout and no other use of `training`.
            unfused_mamba2 = True
            emit("note", text="fla-mamba2 ran its unfused fast path (fla's Triton short conv, then mamba_ssm's "
                              "Triton SSD scan): its fused training kernel needs the causal_conv1d CUDA extension, "
                              "not installed; only the Mamba-2 mixers were put in eval mode to take that path")
    if kind == "gated_deltanet":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from delta_rule import switch_off_fla_hopper_guard

        if switch_off_fla_hopper_guard():
            emit("note", text="fla's Hopper guard (issue #640, Triton 3.4–3.7.0) was switched off to time "
                              "fla-gdn; its gradients there are the wrong ones the guard protects against")
    peak = peak_flops(device)
    state: dict = {}
    gen = torch.Generator(device=device).manual_seed(0)

    def build() -> None:
        torch.manual_seed(0)
        model = model_class(config_class(**fields)).to(device)  # fp32 master weights
        model.gradient_checkpointing_enable()
        model.train()
        if unfused_mamba2:
            for module in model.modules():
                if isinstance(module, fla_mamba2.Mamba2):
                    module.eval()
        state["model"] = model
        state["opt"] = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95), weight_decay=0.1,
                                         fused=True)
        state["n"] = sum(p.numel() for p in model.parameters())  # tied weight counted once

    def step(T: int) -> float:
        model, opt = state["model"], state["opt"]
        x = torch.randint(1, fields["vocab_size"], (batch_of(job, T), T), device=device, generator=gen)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(input_ids=x, labels=x).loss  # HF shifts the labels
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    emit("start", what="warmup", seq_len=Ts[0])
    failed = None
    try:
        start = time.perf_counter()
        build()
        built = time.perf_counter()
        print(f"train_step: {label} {state['n'] / 1e6:.1f}M params, built in {built - start:.1f} s; "
              f"warm-up step at T={Ts[0]} (Triton autotuning, minutes) …", file=sys.stderr, flush=True)
        loss = step(Ts[0])
        torch.cuda.synchronize()
        secs = time.perf_counter() - built
    except Exception as e:  # noqa: BLE001 — that row's status; a next worker (if any) warms up at the next T
        failed = "oom" if is_oom(e) else f"error: {one_line(e)}"
        if failed != "oom":
            import traceback

            traceback.print_exc()
    if failed is not None:
        state.clear()
        free_memory()
        emit("row", seq_len=Ts[0], status=failed)
        return
    print(f"train_step: {label} warm-up step at T={Ts[0]} took {secs:.1f} s (loss {loss:.3f})",
          file=sys.stderr, flush=True)
    emit("warmup", seq_len=Ts[0], seconds=secs)

    def row(T: int) -> dict:
        try:
            m = measure(lambda i: step(T), device, job["warmup"], job["steps"])
        finally:
            state["opt"].zero_grad(set_to_none=True)
        out = stats_row(T, batch_of(job, T), m, flops_per_token(ours.model, T, n_ours), state["n"], peak)
        out["fla_config"] = fields
        return out

    run_rows({**job, "seq_lens": Ts}, device, row)


def worker(job: dict) -> None:
    watch_parent()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    emit("env", device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
         peak_flops=peak_flops(device))
    (longtrain_worker if job["impl"] == "longtrain" else fla_worker)(job, device)


# -- parent side: start workers, enforce the per-row timeout, collect rows ------------------------------------
class Results:
    """This run's rows, kept with the other runs' rows of the JSON file (rewritten atomically per row)."""

    def __init__(self, path: Path, meta: dict):
        self.path, self.meta, self.rows = path, meta, []
        self.previous = []
        if path.exists():
            try:
                self.previous = json.loads(path.read_text())
            except ValueError as e:
                raise SystemExit(f"{path} is not valid JSON ({e}); move it away or pass --out") from None
            if not isinstance(self.previous, list):
                raise SystemExit(f"{path} does not hold a JSON list; move it away or pass --out")

    def add(self, impl: str, row: dict) -> None:
        row = {"impl": impl, **row, **self.meta}
        for key in ("tokens_per_s", "ms_per_step", "mfu", "mfu_6n", "peak_gib", "loss_first", "loss_last"):
            row[key] = math.nan if row.get(key) is None else row[key]  # the worker's JSON has null for NaN
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(clean(self.previous + self.rows), indent=1) + "\n")
        tmp.replace(self.path)
        print(f"train_step: {impl} T={row['seq_len']}: {row['status']}"
              + (f", {row['tokens_per_s']:,.0f} tokens/s, peak {fmt(row['peak_gib'], 1)} GiB"
                 if row["status"] == "ok" else ""), file=sys.stderr, flush=True)


def pump(stream, q: queue.Queue | None, tail: deque | None) -> None:
    """stdout lines → q (then None at EOF); stderr lines → our stderr and `tail`."""
    for line in stream:
        if q is not None:
            q.put(line)
        else:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.strip():
                tail.append(line.strip())
    if q is not None:
        q.put(None)


def run_impl(impl: str, job: dict, args: argparse.Namespace, results: Results, env: dict) -> None:
    """Rows of one impl/variant: a worker per attempt; a crash costs only its row, a hang is killed at
    the row timeout; after an OOM or a timeout the larger T are skipped."""
    pending, skipped, first, extra = list(job["seq_lens"]), None, True, {}
    while pending:
        if skipped:
            for T in pending:
                results.add(impl, dict(seq_len=T, status=skipped))
            return
        child = {**job, "seq_lens": pending, "first_is_check": first}
        first = False
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker", json.dumps(child)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: queue.Queue = queue.Queue()
        tail: deque = deque(maxlen=20)
        readers = [threading.Thread(target=pump, args=(proc.stdout, lines, None), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, None, tail), daemon=True)]
        for t in readers:
            t.start()
        current, what, progressed = None, "row", False
        deadline = time.monotonic() + args.row_timeout  # the worker's start counts as part of its first row
        try:
            while True:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:  # the row (or fla's warm-up step) ran past its time: kill the worker
                    proc.kill()
                    T = current if current is not None else pending[0]
                    limit = args.warmup_timeout if what == "warmup" else args.row_timeout
                    results.add(impl, dict(seq_len=T, status="timeout", timeout_s=limit, **extra))
                    pending.remove(T)
                    skipped = "timeout (skipped: smaller T already timed out)"
                    break
                if line is None:  # the worker exited
                    rc = proc.wait()
                    for t in readers:
                        t.join(timeout=5)
                    why = f"worker exited with {rc}: {tail[-1] if tail else 'no output'}"[:300]
                    if current is not None:  # inside a row: that row failed, the next worker goes on
                        results.add(impl, dict(seq_len=current, status=f"error: {why}", **extra))
                        pending.remove(current)
                    elif not progressed:  # before any row: do not start it again
                        skipped = f"error: {why}"
                    break
                if not line.startswith(PROTO):
                    sys.stderr.write(line)
                    continue
                ev = json.loads(line[len(PROTO):])
                kind = ev.pop("event")
                if kind == "env":
                    env.update(ev)
                    results.meta["device"] = ev["device"]
                elif kind == "start":
                    current, what = ev["seq_len"], ev["what"]
                    deadline = time.monotonic() + (args.warmup_timeout if what == "warmup" else args.row_timeout)
                elif kind == "note":
                    notes = results.meta.setdefault("notes", [])
                    if ev["text"] not in notes:
                        notes.append(ev["text"])
                elif kind == "warmup":
                    extra.update(fla_warmup_s=ev["seconds"], fla_warmup_seq_len=ev["seq_len"])
                    current, what = None, "row"
                    deadline = time.monotonic() + args.row_timeout
                elif kind == "row":
                    results.add(impl, {**ev, **extra})
                    pending.remove(ev["seq_len"])
                    current, progressed = None, True
                    deadline = time.monotonic() + args.row_timeout
                    if ev["status"] == "oom":
                        skipped = "oom (skipped: smaller T already OOM)"
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def fmt(x, digits: int = 2) -> str:
    return MISSING if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{digits}f}"


def render(rows: list[dict]) -> str:
    hdr = ("| impl | seq_len | tokens/s | ms/step | MFU (ours) | MFU (6N) | peak GiB | status | loss first / last |\n"
           "|---|---:|---:|---:|---:|---:|---:|---|---|")
    lines = [hdr]
    pct = lambda x: MISSING if x is None or not math.isfinite(x) else f"{100 * x:.1f} %"  # noqa: E731
    for r in rows:
        tps = r["tokens_per_s"]
        lines.append(" | ".join([
            f"| {r['impl']}", str(r["seq_len"]) + (f" ×{r['batch']}" if r.get("batch", 1) > 1 else ""),
            MISSING if not math.isfinite(tps) else f"{tps:,.0f}",
            fmt(r["ms_per_step"], 1), pct(r["mfu"]), pct(r["mfu_6n"]), fmt(r["peak_gib"], 1), r["status"],
            f"{fmt(r['loss_first'], 3)} / {fmt(r['loss_last'], 3)} |"]))
    return "\n".join(lines)


def git_commit() -> str:
    """The commit of the tree that runs: $LONGTRAIN_COMMIT where set (a copy of a working tree whose git HEAD is
    an older commit, as on a lent GPU machine), else `git rev-parse HEAD`."""
    if os.environ.get("LONGTRAIN_COMMIT"):
        return os.environ["LONGTRAIN_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def interrupted(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq-lens", default=DEFAULT_SEQ_LENS,
                    help="comma list of tokens per sequence (32K, 1M …), each optionally xBATCH (4Kx32)")
    ap.add_argument("--only", choices=("longtrain", "fla"), default=None, help="one implementation (default both)")
    ap.add_argument("--preset", default="1b", help="our model preset (fla is built with the same shape)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for every longtrain variant (repeatable), e.g. train.window=8192")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME[@LEN+LEN]:KEY=V,KEY=V",
                    help="a named longtrain variant (repeatable), optionally on its own lengths; default one "
                         "variant 'default'")
    ap.add_argument("--fla-model", choices=sorted(FLA_MODELS), default=None,
                    help="fla's anchor model (default: from the preset's layout: L retnet, D gated_deltanet, M mamba2)")
    ap.add_argument("--fla-set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra field of the fla model's config (repeatable), e.g. expand_v=2.0")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps per row (at least 1: the loss check)")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per row")
    ap.add_argument("--steps-check", type=int, default=0,
                    help="longtrain: run this many steps at the first seq len and record every loss")
    ap.add_argument("--row-timeout", type=float, default=300.0, help="seconds per row before its worker is killed")
    ap.add_argument("--warmup-timeout", type=float, default=540.0, help="seconds for fla's first (autotuning) step")
    ap.add_argument("--profile", type=Path, default=None, metavar="DIR",
                    help="after each longtrain row, profile one more step: kernel table → DIR/VARIANT_T.txt")
    ap.add_argument("--memory", type=Path, default=None, metavar="DIR",
                    help="after each longtrain row (CUDA), one more step with the allocator's history: what is "
                         "alive at its peak, by allocating line → DIR/VARIANT_T.md (benchmarks/memory_peak.py)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON list the rows are appended to")
    ap.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._worker is not None:
        worker(json.loads(args._worker))
        return
    signal.signal(signal.SIGTERM, interrupted)  # `timeout` stops us: kill the worker, print what finished

    lens = parse_lens(args.seq_lens)
    variants = [parse_variant(v) for v in args.variant] or [("default", [], None)]
    if len({n for n, _, _ in variants}) != len(variants):
        raise SystemExit("--variant names must differ")
    for p in args.set + args.fla_set:
        if "=" not in p:
            raise SystemExit(f"{p!r}: use KEY=VALUE")
    base = base_overrides(args.preset) + args.set
    for name, pairs, _ in variants:  # a wrong key fails here, before any worker starts
        try:
            load_config(None, base + pairs)
        except ConfigError as e:
            raise SystemExit(f"train_step: variant {name!r}: {e}") from None
    fla_model = args.fla_model or fla_model_for(load_config(None, base).model.layer_kinds())
    fla_label = FLA_MODELS[fla_model]
    common = dict(seq_lens=list(lens), batches=lens, warmup=args.warmup, steps=args.steps, steps_check=0,
                  fla_set=args.fla_set, fla_model=fla_model, profile=str(args.profile) if args.profile else None,
                  memory=str(args.memory) if args.memory else None)
    meta = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, triton=version("triton"), fla=version("fla-core"),
                git_commit=git_commit(), command=shlex.join([sys.executable, *sys.argv]),
                warmup=args.warmup, steps=args.steps)
    results = Results(args.out, meta)
    env: dict = {}
    print(f"train_step: seq lens {lens} (length: batch), torch {meta['torch']}, triton {meta['triton']}, "
          f"fla {meta['fla']}, commit {meta['git_commit'][:12]}", file=sys.stderr, flush=True)
    try:
        if args.only in (None, "longtrain"):
            for i, (name, pairs, own) in enumerate(variants):  # --steps-check: the first variant's first row
                job = dict(common, impl="longtrain", variant=name, overrides=base + pairs,
                           steps_check=args.steps_check if i == 0 else 0)
                if own is not None:
                    job.update(seq_lens=list(own), batches=own)
                run_impl(f"longtrain[{name}]", job, args, results, env)
        if args.only in (None, "fla"):
            job = dict(common, impl="fla", variant="", overrides=base)
            run_impl(fla_label, job, args, results, env)
    except KeyboardInterrupt:
        print("train_step: interrupted; the table has the rows finished so far", file=sys.stderr)

    print(f"\n{env.get('device', '?')}, batch 1 unless ×B, torch {meta['torch']}, triton {meta['triton']}, "
          f"fla {meta['fla']}, {meta['date']}, commit {meta['git_commit'][:12]}; {args.warmup} warm-up + "
          f"{args.steps} timed steps, median; MFU on {fmt((env.get('peak_flops') or math.nan) / 1e12, 0)} TFLOP/s\n")
    print(render(results.rows))
    for r in results.rows:
        if r.get("fla_warmup_s") is not None:
            print(f"\n{fla_label}: one warm-up step (Triton autotuning) at T={r['fla_warmup_seq_len']} took "
                  f"{r['fla_warmup_s']:.1f} s before anything was timed")
            break
    for note in results.meta.get("notes", []):
        print(f"\nnote: {note}")
    for r in results.rows:
        if r.get("losses"):
            first, last = r["losses"][0], r["losses"][-1]
            verdict = "decreasing" if first is not None and last is not None and last < first else "NOT decreasing"
            print(f"steps-check {r['impl']} T={r['seq_len']}: {len(r['losses'])} steps, loss {fmt(first, 4)} → "
                  f"{fmt(last, 4)} ({verdict})")
    print(f"\nrows appended to {args.out}")


if __name__ == "__main__":
    main()
