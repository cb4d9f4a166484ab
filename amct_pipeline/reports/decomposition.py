"""The decomposition report: per layer rank, FLOPs and parameters before/after, weight error; model SQNR."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

__all__ = ["LayerReport", "DecompositionReport", "format_table"]


@dataclass
class LayerReport:
    name: str
    mode: str
    rank: tuple[int, ...]
    children: list[str]
    flops_before: Optional[int]
    flops_after: Optional[int]
    params_before: int
    params_after: int
    weight_error: float                       # ‖W − Ŵ‖/‖W‖ of the composed children
    response_sqnr_db: Optional[float] = None  # layer output SQNR on the sampled calibration positions
    response_sqnr_before_refit_db: Optional[float] = None   # the same before the last child's refit


@dataclass
class DecompositionReport:
    method: str
    data_aware: bool
    target: Optional[float]
    target_metric: str
    layers: list[LayerReport] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    output_sqnr_db: Optional[float] = None    # model outputs, decomposed vs float, on the dataset
    dataset: Optional[str] = None
    samples: int = 0

    def total(self, key: str) -> Optional[int]:
        values = [getattr(layer, key) for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    @property
    def flops_reduction(self) -> Optional[float]:
        """FLOPs of the decomposed layers before / after (2.5 = 2.5x fewer)."""
        before, after = self.total("flops_before"), self.total("flops_after")
        return before / after if before and after else None

    @property
    def params_reduction(self) -> Optional[float]:
        before, after = self.total("params_before"), self.total("params_after")
        return before / after if before and after else None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["flops_reduction"] = self.flops_reduction
        data["params_reduction"] = self.params_reduction
        for layer in data["layers"]:
            layer["rank"] = list(layer["rank"])
        return _finite(data)

    def table(self) -> str:
        return format_table(self)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: Optional[float], spec: str = ",") -> str:
    return "n/a" if value is None else format(value, spec)


def _db(value: Optional[float]) -> str:
    return "n/a" if value is None else ("inf" if math.isinf(value) else f"{value:.2f}")


def format_table(report: DecompositionReport) -> str:
    """A plain-text table for the terminal, then totals, model SQNR and layers left alone."""
    header = ["layer", "mode", "rank", "FLOPs before", "FLOPs after", "x", "params before", "params after",
              "weight err", "resp. SQNR dB"]
    rows = [[layer.name, layer.mode, "x".join(map(str, layer.rank)), _num(layer.flops_before),
             _num(layer.flops_after), _ratio(layer.flops_before, layer.flops_after), _num(layer.params_before),
             _num(layer.params_after), f"{layer.weight_error:.4f}", _db(layer.response_sqnr_db)]
            for layer in report.layers]
    rows.append(["total", "", "", _num(report.total("flops_before")), _num(report.total("flops_after")),
                 _ratio(report.total("flops_before"), report.total("flops_after")),
                 _num(report.total("params_before")), _num(report.total("params_after")), "", ""])
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list) -> str:     # names left-aligned, numbers right-aligned
        return "  ".join(str(c).rjust(w) if i >= 2 else str(c).ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    mode = "data-aware" if report.data_aware else "data-free"
    target = f", keep {report.target:g} of {report.target_metric}" if report.target else ""
    out = [f"decompose ({report.method}, {mode}{target}): {len(report.layers)} layer(s) decomposed",
           line(header), line(["-" * w for w in widths]), *map(line, rows)]
    if report.output_sqnr_db is not None:
        out.append(f"model output SQNR on '{report.dataset}' ({report.samples} samples): "
                   f"{_db(report.output_sqnr_db)} dB")
    out += [f"left alone: {name}: {reason}" for name, reason in report.skipped.items()]
    return "\n".join(out)


def _ratio(before: Optional[int], after: Optional[int]) -> str:
    return f"{before / after:.2f}" if before and after else "n/a"
