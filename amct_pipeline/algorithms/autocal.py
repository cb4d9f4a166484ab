"""Accuracy-based auto calibration (SPEC 8.1): the evaluator protocol and the two search strategies.

AMCT's ``accuracy_based_auto_calibration`` quantizes every layer, ranks the layers by sensitivity and,
when the user's metric is not met, rolls back (keeps in float) the most sensitive prefix of the
ranking, found by binary search. ``raise_precision`` searches the same prefix but raises its
precision instead (INT16 activations where SPEC 6.1 allows them, INT8 weights where INT4 was
asked), only among configurations within a bitops budget.

The searches are pure: they call ``satisfied(k)`` for the prefix length ``k`` they want to try, so
the pass decides how a trial is built, evaluated, remembered across a restart and reported.
"""
from __future__ import annotations

import abc
import math
from typing import Any, Callable, Optional

from ..errors import ConfigError

__all__ = ["AutoCalibrationEvaluatorBase", "binary_search", "check_metric", "check_verdict", "evaluator_name"]


class AutoCalibrationEvaluatorBase(abc.ABC):
    """AMCT's evaluator (``amct_onnx.common.auto_calibration.AutoCalibrationEvaluatorBase``).

    ``evaluate(model_file)`` returns the metric of a model file (float model, then fake-quant models);
    ``metric_eval(original_metric, new_metric)`` returns ``(acceptable, loss)``. ``calibration``
    (AMCT runs the calibration model with it) is kept for AMCT code; here the ``calibrate`` pass
    calibrates from the pipeline's dataset, so the default does nothing.
    """

    def calibration(self, model_file: str) -> None:     # noqa: B027 - optional in this toolkit
        return None

    @abc.abstractmethod
    def evaluate(self, model_file: str) -> float: ...

    @abc.abstractmethod
    def metric_eval(self, original_metric: float, new_metric: float) -> tuple[bool, float]: ...


def evaluator_name(evaluator: Any) -> str:
    return evaluator if isinstance(evaluator, str) else type(evaluator).__name__


def check_metric(value: Any, where: str) -> float:
    """The evaluator's metric as a float, or a one-line error naming the call."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise ConfigError(f"{where} returned {type(value).__name__} {value!r:.60}, not a number; "
                          "evaluate(model_file) must return the metric as a float")
    number = float(value)
    if not math.isfinite(number):
        raise ConfigError(f"{where} returned {number}, not a finite number; check the evaluator")
    return number


def check_verdict(value: Any, where: str) -> tuple[bool, float]:
    """``metric_eval``'s ``(bool, float)``, or a one-line error."""
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise ConfigError(f"{where} returned {value!r:.60}; metric_eval must return (acceptable: bool, loss: float)")
    ok, loss = value
    return bool(ok), check_metric(loss, where)


def binary_search(count: int, satisfied: Callable[[int], bool], *, lowest: int = 1) -> Optional[int]:
    """AMCT's BinarySearch over prefix lengths ``lowest .. count``: the shortest prefix found that
    satisfies, or None.

    AMCT tries ``mid = (left + right) // 2`` over prefix indices (``0 .. n-1``, prefix length
    ``index + 1``): a satisfying prefix moves ``right`` below it (try fewer), a failing one moves
    ``left`` above it; it stops when ``left > right`` and keeps the last satisfying prefix. Like
    AMCT it assumes that more roll-backs never hurt; it finds the fewest roll-backs under that
    assumption with about log2(n) evaluations.
    """
    left, right, best = lowest - 1, count - 1, None
    while left <= right:
        mid = (left + right) // 2
        if satisfied(mid + 1):
            best, right = mid + 1, mid - 1
        else:
            left = mid + 1
    return best
