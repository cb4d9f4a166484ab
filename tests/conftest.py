"""Shared fixtures: a hermetic session and access to ../shared models and data."""
from __future__ import annotations

from pathlib import Path

import pytest

from amct_pipeline.session import Session

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(name: str) -> Path:
    """A file under ../shared, or skip the test naming the missing file."""
    path = SHARED / name
    if not path.exists():
        pytest.skip(f"missing ../shared/{name}")
    return path


@pytest.fixture
def session() -> Session:
    return Session(load_entrypoints=False)
