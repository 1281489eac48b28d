"""`longtrain calibrate`: measure the cost model's constants on this machine into a `[hardware]` TOML file.

    GEMM TFLOP/s         forward + backward of the model's projection shapes (x W1, · W2), bf16 autocast on CUDA
    attention TFLOP/s    causal SDPA with grouped-query heads, forward + backward (CUDA: also on cuDNN)
    host link GB/s       CUDA: copies between the device and pinned host memory (parallel.offload)
    kernel tokens/s      `kernels.linear_attention` forward, and forward + backward with and without a gate,
                         reported at the reference geometry H·K·V = 16·128·128 (`runtime.plan.REFERENCE_HKV`)
    copy GB/s            a large device copy (bytes read + written)
    collectives          all-gather of 4 KiB (latency) and 256 MiB (bus bandwidth) per rank over every local GPU
                         (nccl); on a CPU between two local processes (gloo, 4 KiB and 64 MiB); with one GPU they
                         are taken from `--base` and the file says so
    host overheads       CPU only (CUDA queues its kernels asynchronously, the host time hides behind them): the
                         Trainer's step of a small model at 2 and 6 layers of 64 tokens and 6 layers of 128, in
                         a fresh process, minus what the plan's compute terms predict for it; the difference per
                         layer and micro-batch is `layer_overhead_ms` (Python and op dispatch per layer, forward +
                         backward), per chunk of a recurrent layer `chunk_overhead_ms` (the CPU path loops over
                         chunks), the rest `step_overhead_ms`; each step is timed beside a fixed host workload
                         (`runtime.metrics.speed_anchor_s`) whose median is `anchor_ms`, the host speed these
                         hold at; that process's peak resident memory is `process_gib` (the runtime
                         itself: a CPU rank's measured memory is its resident set, not the model's tensors alone);
                         then the same probe as two ranks at once (parallel.sp=2): the time they spend inside
                         collectives beyond the plan's latency and bytes, per unit of one-rank host time per layer,
                         is `peer_wait_factor` (the ranks waiting for each other), and the rest of their host time
                         over what the one-rank constants predict is `shared_host_factor` (sharing the node's cores)

The inter-node bandwidth is a parameter (`--inter-node-gbit`, per GPU); the file's `source` line records the
device, the versions and what was copied. `longtrain plan --gpu FILE` reads it.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from runtime.plan import REFERENCE_HKV, Hardware, load_hardware


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median seconds of fn() after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _shapes(device: torch.device, quick: bool) -> dict:
    if device.type == "cuda" and not quick:
        return dict(tokens=16384, dim=2048, ffn=6144, heads=16, kv=8, hd=128, seq=16384, la_tokens=262144,
                    la_heads=16, la_dim=128, copy_mib=1024, reps=10)
    return dict(tokens=512, dim=256, ffn=512, heads=4, kv=2, hd=32, seq=512, la_tokens=1024, la_heads=2,
                la_dim=32, copy_mib=64, reps=3)


def measure_compute(device: torch.device, quick: bool = False) -> dict:
    """The compute constants of one device (CUDA: bf16 autocast; CPU: fp32)."""
    import torch.nn.functional as F

    from kernels import linear_attention

    s = _shapes(device, quick)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    dtype = torch.bfloat16 if cuda else torch.float32
    x = torch.randn(s["tokens"], s["dim"], device=device, requires_grad=True)
    w1 = torch.randn(s["ffn"], s["dim"], device=device, requires_grad=True)
    w2 = torch.randn(s["dim"], s["ffn"], device=device, requires_grad=True)

    def gemms() -> None:
        with autocast:
            F.linear(F.linear(x, w1), w2).float().sum().backward()

    gemm = 6 * 2 * s["tokens"] * s["dim"] * s["ffn"] / _timed(gemms, device, s["reps"])
    q = torch.randn(1, s["heads"], s["seq"], s["hd"], device=device, dtype=dtype, requires_grad=True)
    kv = [torch.randn(1, s["kv"], s["seq"], s["hd"], device=device, dtype=dtype, requires_grad=True) for _ in "kv"]

    def attention() -> None:
        F.scaled_dot_product_attention(q, *kv, is_causal=True, enable_gqa=True).float().sum().backward()

    attn_flops = 2.0 * s["seq"] ** 2 * s["heads"] * s["hd"] * 3.5
    attn = attn_flops / _timed(attention, device, s["reps"])
    H, D, T = s["la_heads"], s["la_dim"], s["la_tokens"]
    lq, lk, lv = (torch.randn(1, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    gate = torch.full((1, T, H), -0.01, device=device, requires_grad=True)
    decay = torch.full((H,), -0.01, device=device)
    scale = REFERENCE_HKV / (H * D * D)  # tokens/s at the reference geometry

    def la(with_gate: bool, backward: bool):
        def run() -> None:
            with torch.set_grad_enabled(backward):
                o, _ = linear_attention(lq, lk, lv, log_decay=decay, gate=gate if with_gate else None)
                if backward:
                    o.float().sum().backward()
        return T / scale / _timed(run, device, s["reps"])

    n = s["copy_mib"] << 20
    src, dst = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    copy = 2 * n / _timed(lambda: dst.copy_(src), device, s["reps"])
    out = dict(gemm_tflops=gemm / 1e12, attention_tflops=attn / 1e12, la_tokens_per_s=la(False, True),
               la_gate_tokens_per_s=la(True, True), la_forward_tokens_per_s=la(False, False), copy_gbps=copy / 1e9)
    if cuda:  # cuDNN's attention (where torch's SDPA offers it), and copies to and from pinned host memory
        from torch.nn.attention import SDPBackend, sdpa_kernel

        try:
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                out["attention_cudnn_tflops"] = attn_flops / _timed(attention, device, s["reps"]) / 1e12
        except RuntimeError:  # no cuDNN attention here: the plan uses attention_tflops
            pass
        host = torch.empty(n, dtype=torch.uint8, pin_memory=True)
        out["host_link_gbps"] = 2 * n / _timed(lambda: (src.copy_(host, non_blocking=True),
                                                      host.copy_(dst, non_blocking=True)), device, s["reps"]) / 1e9
    return out


def _allgather_rank(out: str, sizes: tuple[int, ...]) -> None:
    """One rank of the collective measurement (spawned; nccl, gloo on a CPU): the median seconds of an all-gather
    of each size in bytes per rank; rank 0 writes them to `out`."""
    import torch.distributed as dist

    from runtime.mesh import init_distributed

    device = init_distributed()
    world = dist.get_world_size()
    result = {}
    for size in sizes:
        x = torch.ones(size // 4, device=device)  # fp32
        parts = [torch.empty_like(x) for _ in range(world)]
        result[size] = _timed(lambda x=x, parts=parts: dist.all_gather(parts, x), device, 10 if size > 1 << 20 else 50)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))


LATENCY_BYTES = 4096  # an all-gather this small is its latency: a collective's fixed cost, wake-ups included


def measure_collectives(ranks: int, big_mib: int = 256) -> dict:
    """Bus bandwidth (GB/s, a `big_mib` MiB all-gather) and latency (µs, a 4 KiB one) of an all-gather over `ranks`
    local GPUs (or CPU processes)."""
    from launch.local import spawn

    big = big_mib << 20
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "allgather.json")
        spawn(_allgather_rank, ranks, out, (LATENCY_BYTES, big), log_dir=Path(tmp) / "logs")
        t = {int(k): v for k, v in json.loads(Path(out).read_text()).items()}
    latency = t[LATENCY_BYTES]
    gbps = big * (ranks - 1) / max(t[big] - latency, 1e-9) / 1e9
    return dict(intra_node_gbps=gbps, latency_us=max(1.0, 1e6 * latency))


# one micro-batch (the plan's unit: per layer and micro-batch; parallel.microbatches defaults to 2), no recompute
HOST_PROBE = ["model.preset=tiny", "train.batch_size=2", "parallel.pp=1", "parallel.microbatches=1",
              "parallel.remat=never", "run.progress=false", "run.tensorboard=false", "data.source=synthetic:zipf"]
# the probe's shapes, name → (layers, seq_len): two depths at one length separate the per-layer host time from the
# per-step one; the deeper probe at twice the length separates the per-chunk host time of the recurrent layers
HOST_PROBES = {"2": (2, 64), "6": (6, 64), "6x128": (6, 128)}


def _probe_config(name: str, ranks: int):
    from runtime.config import load_config

    layers, seq_len = HOST_PROBES[name]
    return load_config(None, [*HOST_PROBE, f"parallel.sp={ranks}", f"model.n_layers={layers}",
                              f"train.seq_len={seq_len}"])


def _host_rank(out: str, reps: int) -> None:
    """One rank of the host probe (spawned; world 1, or several ranks at once over parallel.sp): median seconds
    of the Trainer's step of each of HOST_PROBES, each step at the probe's median host speed
    (runtime.metrics.anchor_between_steps), that speed, and the process's peak resident memory; rank 0 writes
    them to `out`."""
    import resource

    import torch.distributed as dist

    from runtime.mesh import build_mesh
    from runtime.metrics import anchor_between_steps
    from runtime.trainer import Trainer

    world = int(os.environ.get("WORLD_SIZE", "1"))
    mesh, trainers = build_mesh(1, 1, world), {}
    try:
        for name in HOST_PROBES:
            torch.manual_seed(0)
            trainers[name] = Trainer(_probe_config(name, world), mesh)
        times, comms, anchors = ({name: [] for name in HOST_PROBES} for _ in range(3))
        for i in range(reps + 1):  # the probes' steps alternate: a shared machine's load drifts over all alike
            for name, trainer in trainers.items():
                res = trainer.step(i)
                anchor = anchor_between_steps(mesh.rank, world)  # the machine's speed beside this step
                if i:  # the first step warms up
                    times[name].append(res.seconds)
                    comms[name].append(res.comm_s)
                    anchors[name].append(anchor)
    finally:
        for trainer in trainers.values():
            trainer.close()
    # each step at the probe's median speed: its time over the anchor beside it, × the median anchor
    anchor = statistics.median(a for each in anchors.values() for a in each)

    def at_median_speed(samples: dict) -> dict:
        return {n: anchor * statistics.median(t / a for t, a in zip(samples[n], anchors[n], strict=True))
                for n in HOST_PROBES}

    result = {**at_median_speed(times), "comm": at_median_speed(comms), "anchor_s": anchor}  # comm: in collectives
    result["rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))


def _probe(ranks: int, reps: int) -> dict:
    """The host probe's medians from `ranks` local processes. Its folder (the ranks' logs) is removed on success
    and kept on failure, so the traceback a RankFailed names is still there."""
    import shutil

    from launch.local import RankFailed, spawn

    tmp = tempfile.mkdtemp(prefix="longtrain-calibrate-")
    try:
        out = str(Path(tmp) / "host.json")
        spawn(_host_rank, ranks, out, reps, log_dir=Path(tmp) / "logs")
        result = json.loads(Path(out).read_text())
    except RankFailed as e:  # the launcher's hint names --resume, which calibrate has not
        why = str(e).replace(", then rerun with --resume auto", "").replace(" and rerun with --resume auto", "")
        raise RankFailed(f"the host probe ({ranks} rank{'s' * (ranks > 1)}) failed: {why}; "
                         f"rerun `longtrain calibrate`") from None
    shutil.rmtree(tmp, ignore_errors=True)
    return result


def _solve(rows: list[list[float]], rhs: list[float]) -> list[float]:
    """Least squares (exact when square) of rows · x = rhs, in float64."""
    a, b = torch.tensor(rows, dtype=torch.float64), torch.tensor(rhs, dtype=torch.float64)
    return torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution[:, 0].tolist()


def measure_host_overheads(hw: Hardware, reps: int, shared_ranks: int = 2, launches: int = 1) -> dict:
    """`layer_overhead_ms`, `chunk_overhead_ms`, `step_overhead_ms`, `process_gib`, `shared_host_factor`,
    `peer_wait_factor`, `anchor_ms` and `shared_anchor_ms` of a CPU (module docstring): the measured steps of
    HOST_PROBES minus what `runtime.plan` predicts for them from `hw`'s compute, copy and collective rates. The
    host terms are fitted in the plan's own units (its host_overhead per ms of layer_overhead_ms or
    chunk_overhead_ms), so they mean what the plan multiplies them by; `anchor_ms` is the one-rank probe's host
    speed, the speed they hold at, and `shared_anchor_ms` the two-rank probe's (the reference of two-rank points).
    The several-rank probe runs `launches` times (on a shared VM its steps vary by ±12 % from one launch to the
    next: the ranks' waits for each other) and the medians are fitted."""
    from launch.local import RankFailed
    from runtime.plan import plan_job

    bare = dataclasses.replace(hw, layer_overhead_ms=0.0, chunk_overhead_ms=0.0, step_overhead_ms=0.0,
                               process_gib=0.0, shared_host_factor=1.0, peer_wait_factor=0.0)

    def host_units(ranks: int) -> dict:  # each probe's plan host time per ms of each constant, and what is not host
        units = {}
        for n in HOST_PROBES:
            cfg = _probe_config(n, ranks)
            units[n] = dict(rest=plan_job(cfg, ranks, bare).step_s, **{
                key: plan_job(cfg, ranks, dataclasses.replace(bare, **{key: 1.0})).compute["host_overhead"]
                for key in ("layer_overhead_ms", "chunk_overhead_ms")})
        return units

    one = _probe(1, reps)
    anchor_s = one.get("anchor_s") or 0.0
    u1 = host_units(1)
    keys = ("layer_overhead_ms", "chunk_overhead_ms")
    rhs = [one[n] - u1[n]["rest"] for n in HOST_PROBES]
    layer, chunk, step = _solve([[u1[n][k] for k in keys] + [1.0] for n in HOST_PROBES], rhs)
    if chunk < 0 or layer <= 0:  # the chunks' time within the noise: the other two fitted again without it
        chunk = 0.0
        layer, step = _solve([[u1[n]["layer_overhead_ms"], 1.0] for n in HOST_PROBES], rhs)
    layer, step = max(0.0, layer), max(0.0, step)
    constants = dict(layer_overhead_ms=layer, chunk_overhead_ms=chunk, step_overhead_ms=1e3 * step,
                     process_gib=one["rss_gib"], anchor_ms=1e3 * anchor_s)
    try:
        runs = [_probe(shared_ranks, reps) for _ in range(launches)]
        two = {n: statistics.median(r[n] for r in runs) for n in HOST_PROBES}
        anchors = [r["anchor_s"] for r in runs if r.get("anchor_s")]
        constants["shared_anchor_ms"] = 1e3 * statistics.median(anchors) if anchors else 0.0
        if all("comm" in r for r in runs):
            two["comm"] = {n: statistics.median(r["comm"][n] for r in runs) for n in HOST_PROBES}
    except RankFailed as e:  # the one-rank constants stand; the factor stays "not modelled", and the file says why
        print(f"longtrain: calibrate: {e} — shared_host_factor left at 1 (not modelled)", file=sys.stderr)
        return dict(constants, shared_host_factor=1.0, peer_wait_factor=0.0,
                    note=f"shared_host_factor not measured: {e}")
    # several ranks on the node's cores at once: what is left of their steps beside the plan's compute and
    # collectives, over what the one-rank host constants predict for them (least squares over the probes)
    u2 = host_units(shared_ranks)
    per_layer = {n: layer * u2[n]["layer_overhead_ms"] + chunk * u2[n]["chunk_overhead_ms"] for n in HOST_PROBES}
    host = {n: per_layer[n] + step for n in HOST_PROBES}
    if not any(host.values()):
        return dict(constants, shared_host_factor=1.0, peer_wait_factor=0.0)

    def lsq(y: dict, x: dict) -> float:  # the least-squares slope of y = a·x over the probes
        return sum(y[n] * x[n] for n in x) / sum(v * v for v in x.values()) if any(x.values()) else 0.0

    # of what is left, the time inside collectives beyond the plan's own (latency and bytes) is the ranks waiting
    # for each other: modelled on the per-layer host time, as communication; the rest scales the host terms
    wait = {n: float(two["comm"][n]) - plan_job(_probe_config(n, shared_ranks), shared_ranks, bare).comm_s
            for n in HOST_PROBES} if "comm" in two else {n: 0.0 for n in HOST_PROBES}
    wait_factor = max(0.0, lsq(wait, per_layer))
    factor = lsq({n: two[n] - u2[n]["rest"] - wait_factor * per_layer[n] for n in host}, host)
    return dict(constants, shared_host_factor=max(1.0, factor), peer_wait_factor=wait_factor)


def calibrate(name: str | None = None, base: str = "h200", inter_node_gbit: float = 400.0,
              quick: bool = False) -> Hardware:
    from runtime.metrics import PEAK_FLOPS

    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    reference = load_hardware(base)
    measured = measure_compute(device, quick)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    copied = []
    if gpus >= 2:
        measured.update(measure_collectives(gpus))
    elif device.type == "cpu":
        measured.update(measure_collectives(2, big_mib=16 if quick else 64))
    else:
        measured.update(intra_node_gbps=reference.intra_node_gbps, latency_us=reference.latency_us)
        copied.append(f"collectives from {reference.name} (fewer than two GPUs here)")
    if device.type == "cuda":
        label = torch.cuda.get_device_name(0)
        memory = torch.cuda.get_device_properties(0).total_memory / 2**30
        peak = next((v / 1e12 for k, v in PEAK_FLOPS.items() if k in label), measured["gemm_tflops"])
    else:
        label = f"cpu ({os.cpu_count()} cores)"
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        peak = measured["gemm_tflops"]  # no vendor number: MFU against the measured GEMM rate
    date = datetime.date.today().isoformat()
    source = f"longtrain calibrate on {label}, torch {torch.__version__}, {date}" + (
        "; quick shapes" if quick else "") + "".join(f"; {c}" for c in copied)
    kind = re.search(r"\b[A-Z]\d{2,4}\b", label) if device.type == "cuda" else None  # "NVIDIA H100 80GB" → h100
    per_node = max(gpus, 1) if device.type == "cuda" else os.cpu_count() or 1  # CPU: local processes per node
    hw = Hardware(name=name or (kind.group(0).lower() if kind else device.type), memory_gib=memory, peak_tflops=peak,
                  inter_node_gbps=inter_node_gbit / 8, gpus_per_node=per_node, source=source,
                  autocast_bf16=device.type == "cuda", **measured)
    if device.type == "cpu":
        host = measure_host_overheads(hw, reps=3 if quick else 8, launches=1 if quick else 3)
        note = host.pop("note", None)
        hw = dataclasses.replace(hw, **host, source=hw.source + (f"; {note}" if note else ""))
    elif reference.host_optimizer_ns or reference.window_overhead_ms:  # not measured here: the reference's
        hw = dataclasses.replace(hw, host_optimizer_ns=reference.host_optimizer_ns,  # offload_optimizer host step,
                                 window_overhead_ms=reference.window_overhead_ms,  # a streamed window's fixed cost
                                 source=f"{hw.source}; host optimizer step and window cost from {reference.name}")
    return hw


def to_toml(hw: Hardware) -> str:
    lines = ["# written by `longtrain calibrate` (see launch/calibrate.py for what each number measures)",
             "[hardware]"]
    for f in dataclasses.fields(Hardware):
        value = getattr(hw, f.name)
        if isinstance(value, (str, bool)):
            lines.append(f"{f.name} = {json.dumps(value)}")
        elif isinstance(value, float):
            lines.append(f"{f.name} = {value:.6g}" if math.isfinite(value) else f"{f.name} = 0.0")
        else:
            lines.append(f"{f.name} = {value}")
    return "\n".join(lines) + "\n"


def add_calibrate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="hardware.toml", help="the TOML file to write (default hardware.toml)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    parser.add_argument("--name", default=None, help="the profile's name (default: from the device)")
    parser.add_argument("--base", default="h200", help="profile whose collective numbers are used where they "
                                                       "cannot be measured (one GPU, CPU)")
    parser.add_argument("--inter-node-gbit", type=float, default=400.0, help="bandwidth between nodes per GPU, Gb/s")
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds; CPU tests)")
