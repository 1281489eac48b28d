"""Throughput arithmetic and the metrics sinks of rank 0: Parquet file, TensorBoard, progress bar."""

from __future__ import annotations

import math
import resource
from pathlib import Path

import torch

from models import ModelConfig

# dense bf16 peak FLOP/s by device name (vendor numbers; MFU is relative to these)
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}


def flops_per_token(cfg: ModelConfig, seq_len: int, n_params: int) -> float:
    """Training FLOPs per token: 6·(non-embedding params) plus the attention terms, ×3 for fwd+bwd.

    Linear layer (chunk C, per token, forward): intra-chunk q·kᵀ and ·v ≈ 2·C·d (causal half of 2·2·C·d),
    state read and update 2·2·d·d_head. Softmax layer: causal q·kᵀ and ·v ≈ 2·T·d.
    """
    dense = 6.0 * (n_params - cfg.vocab_size * cfg.dim)
    inner = cfg.ssm_expand * cfg.dim  # Mamba-2: the same chunked form over (N, P) heads of the inner width
    # Gated DeltaNet: the linear layer's terms, plus the UT transform (k·kᵀ, the triangular solve, W and u: about
    # 2·C·d more) and the delta correction W·S (2·d·d_head more)
    per_layer = {"L": 2.0 * cfg.chunk_size * cfg.dim + 4.0 * cfg.dim * cfg.head_dim, "A": 2.0 * seq_len * cfg.dim,
                 "M": 2.0 * cfg.chunk_size * inner + 4.0 * inner * cfg.ssm_state,
                 "D": 4.0 * cfg.chunk_size * cfg.dim + 6.0 * cfg.dim * cfg.head_dim}
    attention = sum(per_layer[k] for k in cfg.layer_kinds())
    return dense + 6.0 * cfg.vocab_size * cfg.dim + 3.0 * attention


def peak_flops(device: torch.device) -> float:
    """Peak dense bf16 FLOP/s of one device, NaN where unknown (CPU)."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), math.nan)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def speed_anchor_s(depth: int = 150, size: int = 32) -> float:
    """Seconds of a fixed host workload: forward and backward of a chain of `depth` y ← tanh(y·w + x) on size × size
    CPU matrices, elementwise (below every op's parallel grain: one thread, whatever torch's thread count), so op
    dispatch and autograd bookkeeping like a small model's step. A shared machine's speed drifts (other tenants,
    clocks) by ±25 % within a minute while a step and this anchor, timed side by side, keep their ratio within
    about ±5 % (benchmarks/RESULTS.md, eighteenth session): it is the machine's speed at that time."""
    import time

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, size, size, generator=gen).unbind(0)
    w.requires_grad_()
    start = time.perf_counter()
    y = x
    for _ in range(depth):
        y = torch.tanh(y * w + x)
    y.sum().backward()
    return time.perf_counter() - start


def anchor_between_steps(rank: int, world: int) -> float:
    """speed_anchor_s timed by rank 0 while every other rank waits at a barrier, so it measures one process's
    speed whatever the job's world (calibrate's host probe and a job with run.speed_anchor alike); NaN elsewhere."""
    import torch.distributed as dist

    if world > 1:
        dist.barrier()
    seconds = speed_anchor_s() if rank == 0 else math.nan
    if world > 1:
        dist.barrier()
    return seconds


class MetricsLog:
    """Rows of metrics → `<run_dir>/metrics.parquet` (rewritten at each log step) and TensorBoard."""

    def __init__(self, run_dir: str | Path, tensorboard: bool = True, resume_step: int = 0):
        """A resumed run (resume_step > 0) keeps the rows up to its checkpoint and continues them."""
        import pyarrow.parquet as pq

        self.path = Path(run_dir) / "metrics.parquet"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict] = []
        if resume_step > 0 and self.path.exists():
            self.rows = [r for r in pq.read_table(self.path).to_pylist() if r["step"] <= resume_step]
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops TensorBoard's events after its checkpoint, so no step appears twice
            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                        purge_step=resume_step + 1 if resume_step > 0 else None)

    def log(self, row: dict) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.rows.append(row)
        tmp = self.path.with_suffix(".parquet.tmp")
        pq.write_table(pa.Table.from_pylist(self.rows), tmp)
        tmp.replace(self.path)  # never a half-written metrics file
        if self.writer is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not math.isnan(value):
                    self.writer.add_scalar(key, value, row["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
