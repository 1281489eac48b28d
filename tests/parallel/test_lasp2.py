"""LASP-2 equals single-process linear attention: outputs, final state and every input gradient (initial state too)."""

from __future__ import annotations

import pytest
import torch
from helpers import check_lasp2, run_distributed

from parallel.layout import shard_sequence, unshard_sequence


@pytest.mark.parametrize("sp", [2, 4])
def test_lasp2_matches_single_process(sp: int) -> None:
    run_distributed(check_lasp2, sp, 8 * sp * 5)  # shards of 40 / 20 tokens: tail chunks of 16 included


def test_layout_roundtrip() -> None:
    x = torch.arange(2 * 48).view(2, 48)
    for world in (1, 2, 3, 4):
        for layout in ("contiguous", "zigzag"):
            parts = [shard_sequence(x, r, world, layout) for r in range(world)]
            assert torch.equal(unshard_sequence(parts, layout), x)
    assert shard_sequence(torch.arange(8), 0, 2, "zigzag", dim=0).tolist() == [0, 1, 6, 7]
    with pytest.raises(ValueError, match="divisible by 8"):
        shard_sequence(torch.zeros(2, 36), 0, 4, "zigzag")
