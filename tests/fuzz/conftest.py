"""The fuzzing suite reports how many cases it generated and how long it took."""
from __future__ import annotations

import time

import pytest

from fuzz_helpers import COUNTS, TOTAL

_START: list[float] = []


@pytest.fixture(autouse=True)
def _no_autoload(monkeypatch):
    # entry-point plugins are tested elsewhere; scanning them would cost 50 ms per case here
    monkeypatch.setenv("AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD", "1")


def pytest_collection_finish(session):
    _START.append(time.perf_counter())


def pytest_terminal_summary(terminalreporter):
    if COUNTS:
        seconds = time.perf_counter() - _START[0] if _START else 0.0
        detail = ", ".join(f"{k} {v}" for k, v in sorted(COUNTS.items()))
        terminalreporter.write_line(f"fuzz: {sum(COUNTS.values())} generated cases (budget {TOTAL}) "
                                    f"in {seconds:.1f} s: {detail}")
