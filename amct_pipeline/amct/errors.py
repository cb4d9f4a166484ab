"""Errors raised while reading or writing AMCT's file formats.

Both are ``ValueError`` subclasses whose ``str`` is ready to show to a user: one line per problem,
each naming the file, the place in it and what is wrong. The structured parts stay available as
attributes so callers can re-wrap them (e.g. into the project's located ``ConfigError``).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

__all__ = ["RecordError", "ConfigFileError", "Issue"]


class RecordError(ValueError):
    """A record file (``ScaleOffsetRecord`` text) that cannot be parsed or fails validation."""

    def __init__(self, source: str, message: str, *, layer: str | None = None, field: str | None = None,
                 line: int | None = None, col: int | None = None):
        self.source, self.layer, self.field, self.reason = source, layer, field, message
        self.line, self.col = line, col
        head = source if line is None else f"{source}:{line}:{col}"
        where = "".join([f" layer '{layer}'" if layer is not None else "", f" field {field}" if field else ""])
        super().__init__(f"{head}:{where}: {message}" if where else f"{head}: {message}")


class Issue(NamedTuple):
    """One problem in a config file. ``where`` is a key path such as
    ``conv1.activation_quant_params.search_step``; syntax errors carry ``line``/``col`` instead."""

    source: str
    where: str
    message: str
    line: int | None = None
    col: int | None = None

    def __str__(self) -> str:
        head = self.source if self.line is None else f"{self.source}:{self.line}:{self.col}"
        return f"{head}: {self.where}: {self.message}" if self.where else f"{head}: {self.message}"


class ConfigFileError(ValueError):
    """Every problem found in one config file (JSON quant/retrain config or protobuf-text ``.cfg``)."""

    def __init__(self, issues: Sequence[Issue]):
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))

    @property
    def source(self) -> str:
        return self.issues[0].source if self.issues else ""
