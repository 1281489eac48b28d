"""Shared fixtures. (pyproject's `pythonpath` puts the project root, then tests/ — for helpers.py — on sys.path.)"""

from __future__ import annotations

import os
import sys

import pytest
from helpers import make_token_store

_exit_status = 0


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A small zarr token store (see helpers.make_token_store)."""
    return make_token_store(tmp_path_factory.mktemp("data"))


def pytest_sessionfinish(session, exitstatus) -> None:
    global _exit_status
    _exit_status = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """Once pytest has reported, leave with os._exit and its exit status: tests run one-rank jobs in this
    process (`longtrain train` with one rank, Trainers on a world-1 gloo group), and gloo's worker threads
    can abort interpreter finalization ("terminate called without an active exception"), which would turn
    a green run red after its summary (the reason `launch.local.exit_process` exists)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_exit_status)
