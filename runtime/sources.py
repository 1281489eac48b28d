"""Where a rank's batches come from: one interface over synthetic tasks and zarr token stores.

A `DataSource` hands every (dp, sp) rank its rows (its dp replica's share of the global batch)
and its sequence shards (its sp rank's part, contiguous or zigzag) of global batch `step`,
deterministically, so a resumed run reads exactly what an uninterrupted one would.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Protocol

import torch

from parallel.layout import shard_sequence, shard_windows
from runtime.config import JobConfig
from runtime.data import ZarrTokens
from runtime.synthetic import SyntheticTask

EVAL_SEED_OFFSET = 10**9  # synthetic evaluation batches are steps no training run reaches


class DataSource(Protocol):
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) int64 [rows per replica, local tokens] of training step `step`."""

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of evaluation batch `index`, in the same shape."""

    def cursor(self, next_step: int) -> dict:
        """Where the data stands before `next_step` (saved in checkpoints)."""

    def close(self) -> None:
        """Stop background work (a prefetch thread)."""


class SyntheticSource:
    """A synthetic task (MQAR, passkey): every row is a function of (seed, step, row)."""

    def __init__(self, task: SyntheticTask, batch_size: int, dp_rank: int, dp: int, sp_rank: int, sp: int,
                 layout: str, window: int = 0):
        self.task, self.layout, self.window = task, layout, window
        per_replica = batch_size // dp
        self.rows = range(dp_rank * per_replica, (dp_rank + 1) * per_replica)
        self.sp_rank, self.sp = sp_rank, sp

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.task.rows(step, self.rows)
        if self.window:  # window-major: each window is sharded over sp on its own
            return tuple(shard_windows(t, self.sp_rank, self.sp, self.layout, self.window) for t in (x, y))
        return (shard_sequence(x, self.sp_rank, self.sp, self.layout),
                shard_sequence(y, self.sp_rank, self.sp, self.layout))

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.batch(EVAL_SEED_OFFSET + index)  # held-out: steps no run reaches

    def cursor(self, next_step: int) -> dict:
        return {"step": next_step}

    def close(self) -> None:
        pass


class ZarrSource:
    """A zarr token store; the next step's batch is read by a background thread during this step."""

    def __init__(self, store: ZarrTokens, steps: int):
        self.store, self.steps = store, steps
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="longtrain-data")
        self._next: tuple[int, Future] | None = None

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._next is not None and self._next[0] == step:
            x, y = self._next[1].result()
        else:
            x, y = self.store.batch(step)
        self._next = (step + 1, self._reader.submit(self.store.batch, step + 1)) if step + 1 < self.steps else None
        return x.long(), y.long()

    def eval_batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.store.batch(index)  # a store has no held-out split: its first batches
        return x.long(), y.long()

    def cursor(self, next_step: int) -> dict:
        epoch, position = self.store.cursor(next_step)
        return {"epoch": epoch, "position": position, "step": next_step}

    def close(self) -> None:
        self._reader.shutdown(wait=True, cancel_futures=True)


def build_data_source(cfg: JobConfig, dp_rank: int, dp: int, sp_rank: int, sp: int) -> DataSource:
    """The configured source (`data.source`) for the rank at (dp_rank, sp_rank)."""
    t, layout = cfg.train, cfg.parallel.layout
    window = t.window if sp > 1 else 0  # streaming under sp: window-major shards
    kind, _, where = cfg.data.source.partition(":")
    if kind == "zarr":
        return ZarrSource(ZarrTokens(where, t.seq_len, t.batch_size, dp_rank, dp, sp_rank, sp, layout, t.seed,
                                     window), t.steps)
    task = SyntheticTask(where, cfg.model.vocab_size, t.seq_len, t.seed, cfg.data.num_pairs, cfg.data.passkey_digits)
    return SyntheticSource(task, t.batch_size, dp_rank, dp, sp_rank, sp, layout, window)
