"""What a layer needs to know about the sequence-parallel split it runs under."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from parallel.comm import group_rank_world
from parallel.layout import check_layout, shard_positions

SOFTMAX_METHODS = ("allgather", "ring", "ulysses")
# softmax attention kernels (model.attention_backend): auto = cudnn where it runs, else flash, else math
ATTENTION_BACKENDS = ("auto", "cudnn", "flash", "math")


@dataclass(frozen=True)
class SequenceParallel:
    """The sp group, the shard layout and the softmax-attention method shared by all layers.

    group=None means no sequence split (a world of one sp rank), whatever the default group is.
    """

    group: dist.ProcessGroup | None = None
    layout: str = "contiguous"
    attention: str = "allgather"

    def __post_init__(self) -> None:
        check_layout(self.layout)
        if self.attention not in SOFTMAX_METHODS:
            raise ValueError(f"unknown sp attention method {self.attention!r}; use one of {SOFTMAX_METHODS}")

    @property
    def rank(self) -> int:
        return 0 if self.group is None else group_rank_world(self.group)[0]

    @property
    def world(self) -> int:
        return 1 if self.group is None else group_rank_world(self.group)[1]

    def positions(self, local_len: int, device: torch.device | None = None) -> torch.Tensor:
        """Global positions of this rank's `local_len` tokens."""
        return shard_positions(local_len * self.world, self.rank, self.world, self.layout, device=device)


SINGLE = SequenceParallel()
