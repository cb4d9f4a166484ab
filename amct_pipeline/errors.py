"""The error hierarchy. Library code raises these; only the CLI turns them into exit codes."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = [
    "AmctError",
    "Problem",
    "ConfigError",
    "PluginError",
    "PassError",
    "VerificationError",
    "ModelLoadError",
    "DataError",
    "CalibrationError",
]


class AmctError(Exception):
    """Base of every error amct-pipeline raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One located problem in a pipeline or config file."""

    source: str      # file name, or "<dict>", "<text>"
    path: str        # key path, e.g. "passes[2].options.algorithm"
    message: str
    hint: str = ""

    def __str__(self) -> str:
        where = f"{self.source}: {self.path}: " if self.path else f"{self.source}: "
        return where + self.message + (f"; {self.hint}" if self.hint else "")


class ConfigError(AmctError):
    """A pipeline, dataset or option is wrong; carries every problem found, one per line."""

    def __init__(self, problems: Sequence[Problem] | str) -> None:
        if isinstance(problems, str):
            problems = [Problem("<config>", "", problems)]
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class PluginError(AmctError):
    """A plugin is broken: bad hook, bad class, or a name another provider already took."""


class PassError(AmctError):
    """A pass failed while running; names the pass, its index and the passes before it."""

    def __init__(self, index: int, name: str, previous: Sequence[str], cause: BaseException) -> None:
        self.index, self.pass_name, self.previous = index, name, list(previous)
        ran = ", ".join(self.previous) if self.previous else "none"
        super().__init__(f"passes[{index}] '{name}' failed: {_one_line(cause)} (passes run before it: {ran})")


class VerificationError(AmctError):
    """The graph is structurally invalid (after loading or after a pass)."""


class ModelLoadError(AmctError):
    """A model file cannot be read as ONNX."""


class DataError(AmctError):
    """Calibration or evaluation data do not fit the model."""


class CalibrationError(AmctError):
    """Calibration could not produce factors (NaN activations, too few batches, ...)."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text if isinstance(exc, AmctError) else f"{type(exc).__name__}: {text}".replace("\n", " ")
