"""Instruments run around every pass: timing, IR dumps, progress. Objects, not globals."""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["PassInstrument", "Timing", "DumpIR", "Progress"]


class PassInstrument:
    """Override any of these; the manager calls them in order (after_* in reverse)."""

    def before_pipeline(self, pipeline) -> None: ...
    def before_pass(self, index: int, pass_, graph) -> None: ...
    def after_pass(self, index: int, pass_, graph, result) -> None: ...
    def after_pass_failed(self, index: int, pass_, error: BaseException) -> None: ...
    def after_pipeline(self, result) -> None: ...


class Timing(PassInstrument):
    """Wall time per pass, in seconds, in ``self.times`` as (label, seconds)."""

    def __init__(self) -> None:
        self.times: list[tuple[str, float]] = []
        self._start = 0.0

    def before_pass(self, index, pass_, graph) -> None:
        self._start = time.perf_counter()

    def after_pass(self, index, pass_, graph, result) -> None:
        self.times.append((f"{index}:{pass_.name}", time.perf_counter() - self._start))

    def table(self) -> str:
        rows = [f"| {label} | {seconds:.3f} |" for label, seconds in self.times]
        return "\n".join(["| pass | seconds |", "|---|---|", *rows])


class DumpIR(PassInstrument):
    """Write the model before and/or after passes into ``directory`` (``03_after_fuse_bn.onnx``)."""

    def __init__(self, directory: str | Path, *, before: bool = False, after: bool = True,
                 only: set[str] | None = None, only_if_changed: bool = True) -> None:
        self.directory, self.before, self.after = Path(directory), before, after
        self.only, self.only_if_changed = only, only_if_changed

    def _wanted(self, pass_) -> bool:
        return self.only is None or pass_.name in self.only

    def _dump(self, graph, label: str) -> None:
        from ..files import OutputError, describe_os_error
        from ..ir.io import write_model
        created = [p for p in (self.directory, *self.directory.parents) if not p.exists()]
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            write_model(graph, self.directory / f"{label}.onnx")
        except OSError as exc:     # a file in the way, a full disk: one line naming the dump, not a traceback
            for folder in created:            # innermost first; only the empty folders this dump made
                try:
                    folder.rmdir()
                except OSError:
                    break
            raise OutputError(f"IR dump folder {self.directory}: cannot write {label}.onnx "
                              f"({describe_os_error(exc)})") from None

    def before_pass(self, index, pass_, graph) -> None:
        if self.before and self._wanted(pass_):
            self._dump(graph, f"{index:02d}_before_{pass_.name}")

    def after_pass(self, index, pass_, graph, result) -> None:
        if self.after and self._wanted(pass_) and (result.modified or not self.only_if_changed):
            self._dump(graph, f"{index:02d}_after_{pass_.name}")


class Progress(PassInstrument):
    """One line per pass on stderr: index, name, time and stats."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self._start = 0.0
        self._count = 0

    def before_pipeline(self, pipeline) -> None:
        self._count = len(pipeline.passes)

    def before_pass(self, index, pass_, graph) -> None:
        self._start = time.perf_counter()
        print(f"[{index + 1}/{self._count}] {pass_.name} ...", file=self.stream, flush=True)

    def after_pass(self, index, pass_, graph, result) -> None:
        stats = ", ".join(f"{k}={v}" for k, v in result.stats.items() if not isinstance(v, (list, dict)))
        took = time.perf_counter() - self._start
        print(f"[{index + 1}/{self._count}] {pass_.name} done in {took:.2f}s"
              + (f" ({stats})" if stats else ""), file=self.stream, flush=True)
