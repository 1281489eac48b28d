"""Data and checkpoint throughput (issues 6, 25), on the machine it runs on.

    taskset -c 0 python benchmarks/data.py prepare --mb 256        # prepare-data MB/s, byte tokenizer, one core
    python benchmarks/data.py loader --tokens-per-rank 1048576     # loader seconds per step, 1M tokens per rank
    python benchmarks/data.py checkpoint --preset 400m --dir D     # save (sync, async) / load seconds, vs dd on D
    python benchmarks/data.py train-overhead --preset 125m --every 10   # step time with checkpoints vs without

Inputs are random words (not zeros); outputs are checked before they are timed. `checkpoint` keeps the model
on CUDA when there is one (the snapshot is then a device-to-pinned-host copy), else on the CPU; put --dir on
the disk checkpoints will use (the default is the system temp folder).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _text_parquet(path: str, megabytes: int, seed: int = 0) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    vocab = np.array(["".join(chr(97 + c) for c in rng.integers(0, 26, rng.integers(2, 10))) for _ in range(5000)])
    writer, total = None, 0
    while total < megabytes * 1e6:
        docs = [" ".join(vocab[rng.integers(0, len(vocab), rng.integers(50, 2000))]) for _ in range(2000)]
        table = pa.table({"text": docs})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table)
        total += sum(len(d) for d in docs)
    writer.close()
    return total


def bench_prepare(args: argparse.Namespace) -> str:
    from runtime.data import prepare_data

    tmp = tempfile.mkdtemp(prefix="lt-bench-")
    try:
        src = os.path.join(tmp, "text.parquet")
        n_bytes = _text_parquet(src, args.mb)
        best = []
        for i in range(args.repeats):
            out = os.path.join(tmp, f"s{i}.zarr")
            start = time.perf_counter()
            info = prepare_data(src, out, seq_len=args.seq_len)
            best.append(time.perf_counter() - start)
            assert info["text_bytes"] == n_bytes and info["tokens"] == n_bytes + info["documents"]
            shutil.rmtree(out)
        secs = statistics.median(best)
        return (f"prepare-data, byte tokenizer, {n_bytes / 1e6:.0f} MB of text, seq_len {args.seq_len}, "
                f"chunk {info['chunk_len']}: median {secs:.2f} s over {args.repeats} runs = "
                f"**{n_bytes / secs / 1e6:.1f} MB/s** (goal ≥ 50 MB/s on one core; cores allowed: "
                f"{len(os.sched_getaffinity(0))})")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_loader(args: argparse.Namespace) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from runtime.data import ZarrTokens, prepare_data

    sp = args.sp
    seq_len = args.tokens_per_rank * sp
    tmp = tempfile.mkdtemp(prefix="lt-bench-")
    try:
        rng = np.random.default_rng(0)
        docs = ["".join(chr(c) for c in rng.integers(97, 123, 50000)) for _ in range(seq_len * 4 // 50000 + 2)]
        pq.write_table(pa.table({"text": docs}), os.path.join(tmp, "d.parquet"))
        store = os.path.join(tmp, "s.zarr")
        info = prepare_data(os.path.join(tmp, "d.parquet"), store, seq_len=seq_len)
        loader = ZarrTokens(store, seq_len, 1, 0, 1, 1, sp, "zigzag", seed=0)
        x, y = loader.batch(0)
        assert x.shape == (1, args.tokens_per_rank) and (x[:, 1:] == y[:, :-1]).all()
        times = []
        for step in range(args.repeats):
            start = time.perf_counter()
            loader.batch(step)
            times.append(time.perf_counter() - start)
        secs = statistics.median(times)
        return (f"loader, {args.tokens_per_rank:,} tokens per rank (sp={sp}, zigzag, chunk {info['chunk_len']}), "
                f"{info['sequences']} stored rows: median **{secs * 1e3:.1f} ms** per step over {args.repeats} steps")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _evict(path) -> None:
    """Drop a file's (or a folder's files') pages from the page cache, so that the next read comes from the disk."""
    files = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _raw_disk(folder: str, nbytes: int, block: int = 64 << 20) -> tuple[float, float]:
    """dd-style (`dd bs=64M conv=fdatasync`, then `dd` back after evicting the file): sequential write and read
    bytes/s of `nbytes` of random bytes in one file of `folder`."""
    data = np.random.default_rng(0).integers(0, 256, block, dtype=np.uint8)
    file = os.path.join(folder, "dd.bin")
    n = max(1, nbytes // block)
    start = time.perf_counter()
    with open(file, "wb", buffering=0) as f:
        for _ in range(n):
            view = memoryview(data)
            while view:
                view = view[f.write(view):]
        os.fdatasync(f.fileno())
    write = n * block / (time.perf_counter() - start)
    _evict(file)
    buf = bytearray(block)
    start = time.perf_counter()
    with open(file, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
    read = n * block / (time.perf_counter() - start)
    os.unlink(file)
    return write, read


def bench_dir(path: str | None) -> str | None:
    """--dir, created if missing (a file there is refused in one line)."""
    if path is not None:
        if os.path.exists(path) and not os.path.isdir(path):
            raise SystemExit(f"data.py: --dir {path} is a file; pass a folder")
        os.makedirs(path, exist_ok=True)
    return path


def bench_checkpoint(args: argparse.Namespace) -> str:
    """Synchronous and background saves, and a load from the disk (not the page cache), against the raw
    sequential speed of the same disk measured in the same run; one process. A background save is timed
    twice: the first allocates the (pinned) host buffer, later ones reuse it."""
    from pathlib import Path

    import torch
    import torch.distributed as dist

    from models import LinearLlama, num_parameters, preset
    from runtime.checkpoint import MARKER, load_checkpoint
    from runtime.checkpoint_writer import CheckpointWriter

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    model = LinearLlama(preset(args.preset)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    opt.zero_grad(set_to_none=True)
    n = num_parameters(model)
    config = {"model": {"preset": args.preset, **preset(args.preset).__dict__}}
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    tmp = tempfile.mkdtemp(prefix="lt-bench-", dir=bench_dir(args.dir))
    rows, size = [], 0
    try:
        for mode in args.modes.split(","):
            writer = CheckpointWriter(background=mode == "async", threads=args.threads)
            start = time.perf_counter()  # as a training run does after its first step: in a thread, not timed there
            writer.prepare(model=model, optimizer=opt, writes_params=True)
            writer.wait()
            reserve_s = time.perf_counter() - start if writer.background else None
            blocked, path = [], None
            for step in (1, 2) if writer.background else (1,):
                if path is not None:
                    shutil.rmtree(path)
                path = Path(tmp) / mode / "checkpoints" / f"step_{step:08d}"
                start = time.perf_counter()
                writer.save(path, step=step, model=model, optimizer=opt, config=config, cursor={}, writes_params=True)
                blocked.append(time.perf_counter() - start)
                writer.wait()
            write_s = writer.take_metrics()["checkpoint_write_s"] / len(blocked)
            assert (path / MARKER).exists()
            size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
            _evict(str(path))
            with torch.no_grad():
                for p in model.parameters():
                    p.zero_()
            start = time.perf_counter()
            load_checkpoint(path, model=model, optimizer=opt, config=config)
            load_s = time.perf_counter() - start
            assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
            rows.append((mode, reserve_s, blocked, write_s, size / write_s, size / load_s))
            shutil.rmtree(path.parent.parent)
        dd_write, dd_read = _raw_disk(tmp, size)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        dist.destroy_process_group()
    lines = [f"checkpoint, preset {args.preset} ({n / 1e6:.0f}M params on {device.type}, fp32 weights + AdamW state, "
             f"{size / 2**30:.2f} GiB on disk, one process, {args.threads} writer threads); raw disk, dd-style "
             f"({size / 2**30:.2f} GiB): write {dd_write / 1e6:,.0f} MB/s, read {dd_read / 1e6:,.0f} MB/s", "",
             "| save | host buffer reserved in the background (s) | training stopped (s): first / next save | "
             "write (s) | write MB/s (% of dd) | load MB/s (% of dd) |", "|---|---|---|---|---|---|"]
    for mode, reserve_s, blocked, write_s, write_bps, load_bps in rows:
        stopped = " / ".join(f"{b:.2f}" for b in blocked)
        reserved = "—" if reserve_s is None else f"{reserve_s:.2f}"
        lines.append(f"| {mode} | {reserved} | **{stopped}** | {write_s:.2f} | {write_bps / 1e6:,.0f} "
                     f"({write_bps / dd_write:.0%}) "
                     f"| {load_bps / 1e6:,.0f} ({load_bps / dd_read:.0%}) |")
    return "\n".join(lines)


def bench_train_overhead(args: argparse.Namespace) -> str:
    """The same `longtrain train` run without checkpoints, then with one every N steps (synchronous and
    background writes): seconds per step averaged over the timed steps, the steps' own time plus the time
    saves stopped training (metrics.parquet: step_time_s, checkpoint_block_s)."""
    import subprocess

    import pyarrow.parquet as pq

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    base = [f"model.preset={args.preset}", "parallel.pp=1", "parallel.sp=1", "parallel.microbatches=1",
            f"train.batch_size={args.batch_size}", f"train.seq_len={args.seq_len}", f"train.steps={args.steps}",
            "run.log_every=1", "run.progress=false", "run.tensorboard=false", "train.eval_batches=0", "run.keep=1",
            *args.set]
    variants = {"none": ["run.checkpoint_every=0"],
                **{m: [f"run.checkpoint_every={args.every}", f"run.checkpoint_async={m == 'async'}"]
                   for m in args.modes.split(",")}}
    tmp = tempfile.mkdtemp(prefix="lt-bench-", dir=bench_dir(args.dir))
    per_step, lines = {}, []
    try:
        for name, extra in variants.items():
            run = os.path.join(tmp, name)
            subprocess.run([sys.executable, "-m", "launch.cli", "train", "--nproc", "1", "--set", *base, *extra,
                            f"run.dir={run}"], cwd=root, check=True, stdout=subprocess.DEVNULL)
            rows = pq.read_table(os.path.join(run, "metrics.parquet")).to_pylist()[args.warmup:]
            step_s = statistics.mean(r["step_time_s"] for r in rows)
            block_s = sum(r.get("checkpoint_block_s", 0.0) for r in rows) / len(rows)
            per_step[name] = step_s + block_s
            over = f"{per_step[name] / per_step['none'] - 1:+.1%}" if name != "none" else "—"
            lines.append(f"| {name} | {step_s:.3f} | {block_s:.3f} | **{per_step[name]:.3f}** | {over} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    head = (f"training with a checkpoint every {args.every} steps vs none: `{' '.join(base)}`, steps "
            f"{args.warmup + 1}–{args.steps} timed")
    return "\n".join([head, "", "| checkpoints | step (s) | saves stopped training (s/step) | per step (s) | "
                       "overhead |", "|---|---|---|---|---|", *lines])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--mb", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=65536)
    p.add_argument("--repeats", type=int, default=3)
    p.set_defaults(fn=bench_prepare)
    p = sub.add_parser("loader")
    p.add_argument("--tokens-per-rank", type=int, default=1 << 20)
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--repeats", type=int, default=20)
    p.set_defaults(fn=bench_loader)
    p = sub.add_parser("checkpoint")
    p.add_argument("--preset", default="400m")
    p.add_argument("--dir", default=None, help="where to write (default: the system temp folder)")
    p.add_argument("--modes", default="sync,async", help="saves to time, in order: sync, async")
    p.add_argument("--threads", type=int, default=8, help="writer threads per rank")
    p.add_argument("--device", default=None, help="where the model lives (default: cuda when available, else cpu)")
    p.set_defaults(fn=bench_checkpoint)
    p = sub.add_parser("train-overhead")
    p.add_argument("--preset", default="125m")
    p.add_argument("--every", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=2, help="first steps not timed")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--modes", default="sync,async", help="checkpoint writes to compare with none")
    p.add_argument("--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="more config overrides")
    p.add_argument("--dir", default=None, help="where the runs write (default: the system temp folder)")
    p.set_defaults(fn=bench_train_overhead)
    args = ap.parse_args()
    print(args.fn(args), flush=True)


if __name__ == "__main__":
    main()
