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


def pytest_terminal_summary(terminalreporter):
    """The fuzzing suite (tests/fuzz) reports how many cases it generated and how long they took."""
    import sys
    helpers = sys.modules.get("fuzz_helpers")
    if helpers is not None and helpers.COUNTS:
        detail = ", ".join(f"{k} {v}" for k, v in sorted(helpers.COUNTS.items()))
        terminalreporter.write_line(f"fuzz: {sum(helpers.COUNTS.values())} generated cases (budget {helpers.TOTAL}) "
                                    f"in {helpers.SPAN[1] - helpers.SPAN[0]:.1f} s: {detail}")
