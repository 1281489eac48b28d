"""The run folder: refuse to start a fresh run over an old one, and make sure it can be written.

    <run.dir>/metrics.parquet   tensorboard/   checkpoints/step_*/   logs/rank_<r>.log
"""

from __future__ import annotations

import shutil
from pathlib import Path

from runtime.errors import ConfigError

RUN_OUTPUTS = ("metrics.parquet", "tensorboard", "checkpoints", "logs", ".failure_injected")


def log_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "logs"


def existing_run(run_dir: str | Path) -> list[str]:
    """What of an earlier run the folder holds (metrics, checkpoints), as short descriptions."""
    root = Path(run_dir)
    found = []
    if (root / "metrics.parquet").exists():
        found.append("metrics.parquet")
    ckpts = sorted((root / "checkpoints").glob("step_*")) if (root / "checkpoints").is_dir() else []
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s)")
    return found


def prepare_run_dir(run_dir: str | Path, *, resume: str, overwrite: bool) -> None:
    """Before any process starts: a fresh run (no resume) into a folder that holds a run is refused unless
    `overwrite`, which deletes the old run's outputs; the folder must be writable."""
    root = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other; pass one of them")
    old = existing_run(root)
    if old and not resume:
        if not overwrite:
            raise ConfigError(f"run.dir {str(root)!r} already holds a run ({', '.join(old)}); continue it with "
                              f"--resume auto, start afresh with --overwrite, or choose another run.dir")
        for name in RUN_OUTPUTS:
            path = root / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = root / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"run.dir {str(root)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                          f"choose a writable run.dir") from None
