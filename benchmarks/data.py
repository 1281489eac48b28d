"""Data and checkpoint throughput (issue 6), on the CPU of the machine it runs on.

    taskset -c 0 python benchmarks/data.py prepare --mb 256        # prepare-data MB/s, byte tokenizer, one core
    python benchmarks/data.py loader --tokens-per-rank 1048576     # loader seconds per step, 1M tokens per rank
    python benchmarks/data.py checkpoint --preset 400m             # checkpoint save / load seconds

Inputs are random words (not zeros); outputs are checked before they are timed.
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


def bench_checkpoint(args: argparse.Namespace) -> str:
    import torch
    import torch.distributed as dist

    from models import LinearLlama, num_parameters, preset
    from runtime.checkpoint import MARKER, load_checkpoint, save_checkpoint

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    torch.manual_seed(0)
    model = LinearLlama(preset(args.preset))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step()
    n = num_parameters(model)
    config = {"model": {"preset": args.preset, **preset(args.preset).__dict__}}
    tmp = tempfile.mkdtemp(prefix="lt-bench-", dir=args.dir)
    try:
        path = __import__("pathlib").Path(tmp) / "step_00000001"
        start = time.perf_counter()
        save_checkpoint(path, step=1, model=model, optimizer=opt, config=config, cursor={}, writes_params=True)
        save_s = time.perf_counter() - start
        assert (path / MARKER).exists()
        ref = {k: v.clone() for k, v in model.state_dict().items()}
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
        start = time.perf_counter()
        load_checkpoint(path, model=model, optimizer=opt, config=config)
        load_s = time.perf_counter() - start
        assert all(torch.equal(ref[k], v) for k, v in model.state_dict().items())
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        return (f"checkpoint, preset {args.preset} ({n / 1e6:.0f}M params, fp32 weights + AdamW state, "
                f"{size / 2**30:.2f} GiB on disk, one process): save **{save_s:.1f} s**, load **{load_s:.1f} s**")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        dist.destroy_process_group()


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
    p.set_defaults(fn=bench_checkpoint)
    args = ap.parse_args()
    print(args.fn(args), flush=True)


if __name__ == "__main__":
    main()
