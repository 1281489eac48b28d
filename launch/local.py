"""Local processes: `longtrain train --nproc N` (gloo on CPU, nccl on CUDA), and how every rank ends.

Each rank runs the job inside `run_rank`: an error is written with its traceback to
`<run.dir>/logs/rank_<r>.log` and as one line to `rank_<r>.error`; the launcher waits for the
ranks, and when one fails it stops the others and raises `RankFailed` with the first failing
rank's line (or names the ranks that died or stopped answering). A rank that succeeded leaves
with `os._exit(0)` once everything it owns is closed: interpreter finalization would run the
destructors of gloo's worker threads, which can abort a finished process ("terminate called
without an active exception", SIGABRT) and report a successful job as failed.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from runtime.errors import ConfigError

GRACE_S = 5.0  # after a rank fails: how long the others may take to record their own error
_closed_a_group = False  # this process ran a rank and closed its process group: it must end with os._exit


class RankFailed(RuntimeError):
    """A rank of a local job failed; the message is one line, `exit_code` what the CLI returns."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def configure_threads(procs_per_node: int) -> None:
    """CPU ranks share the node's cores (the same rule under every launcher, so runs compare bitwise)."""
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, procs_per_node)))


def one_line(e: BaseException) -> str:
    """An error as one line: ours (ConfigError and the like) as they are, others with their type."""
    lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
    text = lines[0] if lines else ""
    return text if isinstance(e, ConfigError) or type(e).__module__.startswith(("runtime", "launch")) else \
        f"{type(e).__name__}: {text}"[:400]


def run_rank(fn: Callable, args: tuple, rank: int, log_dir: str | Path) -> int:
    """Run fn(*args) as rank `rank`; returns the exit code (0, 2 for a ConfigError, 1 otherwise) after
    recording any error in `log_dir` and closing the process group."""
    import torch.distributed as dist

    code = 0
    try:
        fn(*args)
    except BaseException as e:  # noqa: BLE001 — every failure of a rank is recorded, then reported once
        code = 2 if isinstance(e, ConfigError) else 1
        log_dir = Path(log_dir)
        try:
            log_dir.mkdir(parents=True, exist_ok=True)
            (log_dir / f"rank_{rank}.log").write_text("".join(traceback.format_exception(e)))
            (log_dir / f"rank_{rank}.error").write_text(json.dumps(
                {"rank": rank, "time": time.time(), "message": _message(e), "exit_code": code,
                 "timeout": _is_timeout(e)}))
        except OSError:  # the log folder itself is unusable: say it on stderr
            traceback.print_exception(e)
    finally:
        if dist.is_initialized():
            global _closed_a_group
            _closed_a_group = True
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 — a broken group after a peer's failure
                pass
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def exit_process(code: int) -> None:
    """End a command-line process with `code`. One that ran a rank in-process (a one-rank `train`) leaves
    with os._exit after flushing, for the reason in the module docstring; any other exits normally."""
    sys.stdout.flush()
    sys.stderr.flush()
    if _closed_a_group:
        os._exit(code)
    sys.exit(code)


def _message(e: BaseException) -> str:
    """The rank's one line; a collective that timed out is said to be a peer that stopped answering."""
    if _is_timeout(e):
        return (f"a peer rank stopped answering: no collective completed within parallel.timeout_s "
                f"({one_line(e)[:160]}); the job was stopped — rerun with --resume auto")
    return one_line(e)


def _is_timeout(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}".lower()
    return "timeout" in text or "timed out" in text


def _worker(rank: int, world: int, port: int, fn: Callable, args: tuple, log_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    configure_threads(world)
    os._exit(run_rank(fn, args, rank, log_dir))


def spawn(fn: Callable, nproc: int, *args, log_dir: str | Path, timeout_s: float | None = None) -> None:
    """Run fn(*args) in `nproc` local processes that form one process group; raises RankFailed (one line)
    when a rank fails, dies or stops answering."""
    log_dir = Path(log_dir)
    for old in log_dir.glob("rank_*.error") if log_dir.exists() else []:
        old.unlink()
    spawn_ctx, port = mp.get_context("spawn"), _free_port()  # plain processes: no queues, no semaphores to leak
    procs = [spawn_ctx.Process(target=_worker, args=(rank, nproc, port, fn, args, str(log_dir)), daemon=False)
             for rank in range(nproc)]
    for p in procs:
        p.start()
    try:
        pending = {p.sentinel: p for p in procs}
        failed_at = None
        while pending:
            wait = None if failed_at is None else max(0.0, failed_at + GRACE_S - time.monotonic())
            ready = multiprocessing.connection.wait(list(pending), timeout=wait)
            for sentinel in ready:
                p = pending.pop(sentinel)
                if p.exitcode != 0 and failed_at is None:
                    failed_at = time.monotonic()
            if failed_at is not None and time.monotonic() >= failed_at + GRACE_S:
                break
        stuck = [rank for rank, p in enumerate(procs) if p.exitcode is None]
    finally:
        for p in procs:  # stopped (SIGSTOP) processes ignore SIGTERM until continued: kill outright
            if p.exitcode is None:
                os.kill(p.pid, signal.SIGKILL)
        for p in procs:
            p.join()
    if all(p.exitcode == 0 for p in procs):
        return
    raise _failure(procs, stuck, log_dir, timeout_s)


def _failure(procs: list, stuck: list[int], log_dir: Path, timeout_s: float | None) -> RankFailed:
    """The one line that says why a local job failed."""
    errors = []
    for path in log_dir.glob("rank_*.error"):
        try:
            errors.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    errors.sort(key=lambda e: e["time"])
    died = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, 1, 2, None) and r not in stuck]
    if died:
        rank, code = died[0]
        how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        return RankFailed(f"rank {rank} died ({how}) without an error; the other ranks were stopped — "
                          f"see {log_dir} for their logs, check memory (dmesg) and rerun with --resume auto")
    if stuck and (not errors or errors[0].get("timeout")):
        ranks = ", ".join(map(str, stuck))
        limit = f"parallel.timeout_s={timeout_s:g}" if timeout_s else "the collective timeout"
        return RankFailed(f"rank(s) {ranks} stopped answering (no collective completed within {limit}); "
                          f"the job was stopped — see {log_dir}, then rerun with --resume auto")
    if errors:
        first = errors[0]
        code = int(first.get("exit_code", 1))  # 2: a configuration error, whose message is all there is to it
        where = "" if code == 2 else f" (traceback: {log_dir}/rank_{first['rank']}.log)"
        return RankFailed(f"rank {first['rank']}: {first['message']}{where}", code)
    codes = {r: p.exitcode for r, p in enumerate(procs)}
    return RankFailed(f"the job failed (exit codes {codes}); see {log_dir}")
