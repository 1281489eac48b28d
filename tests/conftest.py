"""Test-wide set-up: the shared helpers module is importable from every test folder; shared fixtures."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import make_token_store  # noqa: E402


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A small zarr token store (see helpers.make_token_store)."""
    return make_token_store(tmp_path_factory.mktemp("data"))
