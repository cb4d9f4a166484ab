"""Per-layer precision: which activation / weight bit widths a layer type may take, and where a layer's
choice lives in its options.

A layer's precision is carried by its per-layer options (from ``match_layers`` overrides, its
``precision`` option or an AMCT config): ``options["calibrate"]["algorithm_options"]["num_bits"]`` for
activations and ``options["quantize_weights"]["num_bits"]`` for weights; a float layer is not matched
at all. The rules are AMCT's (SPEC 2.1, 6.1), which every built-in target can hold: activations INT8,
or INT16 on Conv / ConvTranspose / Gemm; weights INT8 or INT4 on every weighted layer, INT6 / INT7 on
Conv only (stored as INT8); AveragePool has no weights.
"""
from __future__ import annotations

from typing import Any, Mapping

from ..amct.quant_config import INT16_ACT_TYPES, LOW_BIT_WTS_TYPES, WEIGHTLESS_TYPES

__all__ = ["ACT_BITS", "WTS_BITS", "FLOAT", "precision_options", "layer_bits", "precision_problems"]

ACT_BITS = (8, 16)
WTS_BITS = (4, 6, 7, 8)
FLOAT = "float"


def precision_options(act: int | None = None, wts: int | None = None) -> dict[str, Any]:
    """Per-layer options that set ``act`` / ``wts`` bits (None leaves that side as configured)."""
    options: dict[str, Any] = {}
    if act is not None:
        options["calibrate"] = {"algorithm_options": {"num_bits": act}}
    if wts is not None:
        options["quantize_weights"] = {"num_bits": wts}
    return options


def layer_bits(options: Mapping[str, Any]) -> tuple[Any, Any]:
    """(activation bits, weight bits) a layer's options ask for; None where they leave the default."""
    calibrate = options.get("calibrate") or {}
    act = (calibrate.get("algorithm_options") or {}).get("num_bits") if isinstance(calibrate, Mapping) else None
    weights = options.get("quantize_weights") or {}
    wts = None
    if isinstance(weights, Mapping):
        wts = weights.get("num_bits", (weights.get("algorithm_options") or {}).get("num_bits"))
    return act, wts


def precision_problems(op_type: str, act: Any, wts: Any) -> list[tuple[str, str]]:
    """(field, message) for each bit width ``op_type`` cannot take; empty when both are fine."""
    problems = []
    if act is not None:
        if act not in ACT_BITS:
            problems.append(("act", f"{act!r}-bit activations are not supported; use 8 or 16"))
        elif act == 16 and op_type not in INT16_ACT_TYPES:
            problems.append(("act", f"INT16 activations are not allowed for {op_type} (only "
                                    f"{', '.join(sorted(INT16_ACT_TYPES))}, SPEC 6.1); use 8"))
    if wts is not None:
        if op_type in WEIGHTLESS_TYPES:
            problems.append(("wts", f"{op_type} has no weights; give only act bits (or 'float')"))
        elif wts not in WTS_BITS:
            problems.append(("wts", f"{wts!r}-bit weights are not supported; use 8 or 4 (6 or 7 on Conv)"))
        elif wts in (6, 7) and op_type not in LOW_BIT_WTS_TYPES:
            problems.append(("wts", f"{wts}-bit weights are only allowed for Conv, not {op_type}; use 8 or 4"))
    return problems
