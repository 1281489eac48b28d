"""Fault injection for tests of recovery: `LONGTRAIN_FAIL_AT_STEP=k` kills rank `LONGTRAIN_FAIL_RANK`
(default 1) before step k, on the first attempt only (a marker file in run.dir remembers it);
`LONGTRAIN_FAIL_MODE=raise` makes it raise an error there instead of exiting, `stop` makes it stop itself
(SIGSTOP: a hung rank that never answers again)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path


def failure_from_env(run_dir: str) -> Callable[[int, int], None] | None:
    """A `before_step(step, rank)` hook when the environment asks for an injected failure, else None."""
    at = os.environ.get("LONGTRAIN_FAIL_AT_STEP")
    if at is None:
        return None
    fail_step, fail_rank = int(at), int(os.environ.get("LONGTRAIN_FAIL_RANK", 1))
    marker = Path(run_dir) / ".failure_injected"

    def before_step(step: int, rank: int) -> None:
        if step != fail_step or rank != fail_rank or marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(f"failed rank {rank} before step {step}\n")
        mode = os.environ.get("LONGTRAIN_FAIL_MODE", "exit")
        if mode == "raise":
            raise RuntimeError(f"injected failure on rank {rank} before step {step}")
        if mode == "stop":  # a hung process: alive, silent
            os.kill(os.getpid(), signal.SIGSTOP)
        os._exit(17)

    return before_step
