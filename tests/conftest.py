"""Shared fixtures. (pyproject's `pythonpath` puts the project root, then tests/ — for helpers.py — on sys.path.)"""

from __future__ import annotations

import pytest
from helpers import make_token_store


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """A small zarr token store (see helpers.make_token_store)."""
    return make_token_store(tmp_path_factory.mktemp("data"))
