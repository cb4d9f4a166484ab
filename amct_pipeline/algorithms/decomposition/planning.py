"""Which layers to decompose and at which rank: eligibility rules and FLOPs/params budgets (graph-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .layer import ChildSpec, ConvLayer, Cost, Rank, chain_cost

__all__ = ["RULES", "eligibility_problem", "Choice", "allocate", "cost_of"]

RULES = ("basic", "amct")


def eligibility_problem(layer: ConvLayer, rules: str) -> Optional[str]:
    """Why the layer cannot be decomposed, or None.

    "basic" is the seed's rule (group 1, dilation 1, kernel_h = kernel_w > 2); "amct" adds AMCT's
    internal checks (SPEC 7): stride <= 2, k·min(Cin, Cout) >= 16, and k >= 7 or min(Cin, Cout) >= 64.
    """
    kh, kw = layer.kernel
    if layer.group != 1:
        return f"group={layer.group}: only group-1 convs are decomposed"
    if layer.dilation != (1, 1):
        return f"dilation {list(layer.dilation)}: only dilation 1 is decomposed"
    if kh != kw:
        return f"kernel {kh}x{kw} is not square (kernel_h = kernel_w > 2 is needed)"
    if kh <= 2:
        return f"kernel {kh}x{kw} is too small (kernel_h = kernel_w > 2 is needed)"
    if rules != "amct":
        return None
    channels = min(layer.cin, layer.cout)
    if max(layer.stride) > 2:
        return f"stride {list(layer.stride)} > 2 (AMCT rule; rules: basic lifts it)"
    if kh * channels < 16:
        return f"kernel·min(Cin, Cout) = {kh}·{channels} < 16 (AMCT rule; rules: basic lifts it)"
    if kh < 7 and channels < 64:
        return f"kernel {kh} < 7 and min(Cin, Cout) = {channels} < 64 (AMCT rule; rules: basic lifts it)"
    return None


def cost_of(method, layer: ConvLayer, rank: Optional[Rank]) -> Cost:
    """Cost of the layer decomposed at ``rank`` (of the layer itself when rank is None)."""
    children: Sequence[ChildSpec] = [layer.as_child] if rank is None else method.structure(layer, rank)
    return chain_cost(children, layer.in_hw)


@dataclass(frozen=True)
class Choice:
    """A rank for a layer, or the reason no rank fits the budget."""

    rank: Optional[Rank]
    reason: str = ""


def allocate(method, free: Sequence[ConvLayer], fixed: Mapping[str, tuple[ConvLayer, Rank]], keep: float,
             metric: str) -> dict[str, Choice]:
    """Ranks for ``free`` layers so that all decomposed layers keep at most ``keep`` of ``metric``.

    Each free layer first gets the largest rank within its own share (the budget left after the
    fixed ranks, spread evenly); the rounding slack then goes, a step at a time, to the most costly
    layers while the total stays within budget. Layers that cannot fit are left alone, which keeps
    the promise about the layers that are decomposed.
    """
    before = {layer.name: _metric(method, layer, None, metric) for layer in free}
    budget = keep * (sum(before.values()) + sum(_metric(method, layer, None, metric) for layer, _ in fixed.values()))
    spent = sum(_metric(method, layer, rank, metric) for layer, rank in fixed.values())
    share = (budget - spent) / sum(before.values()) if before else 0.0
    if free and share <= 0:
        raise ValueError(f"the explicit ranks alone keep {spent / budget * keep:.3f} of the {metric} "
                         f"of the decomposed layers, more than the target {keep:g}")
    candidates = {layer.name: method.candidate_ranks(layer) for layer in free}
    index: dict[str, int] = {}
    for layer in free:
        fits = [i for i, r in enumerate(candidates[layer.name])
                if _metric(method, layer, r, metric) <= share * before[layer.name]]
        if fits:
            index[layer.name] = fits[-1]
    _spend_slack(method, free, candidates, index, budget - spent, metric)
    return {layer.name: Choice(candidates[layer.name][index[layer.name]]) if layer.name in index else
            Choice(None, f"even the smallest rank keeps more than {share:.3f} of its {metric} (target {keep:g})")
            for layer in free}


def _spend_slack(method, free, candidates, index, budget: float, metric: str) -> None:
    """Raise ranks one step at a time, costliest layers first, while the total fits the budget."""
    layers = sorted((layer for layer in free if layer.name in index),
                    key=lambda layer: -_metric(method, layer, None, metric))
    total = sum(_metric(method, layer, candidates[layer.name][index[layer.name]], metric) for layer in layers)
    grown = True
    while grown:
        grown = False
        for layer in layers:
            i = index[layer.name]
            if i + 1 >= len(candidates[layer.name]):
                continue
            now = _metric(method, layer, candidates[layer.name][i], metric)
            nxt = _metric(method, layer, candidates[layer.name][i + 1], metric)
            if total - now + nxt <= budget:
                index[layer.name], total, grown = i + 1, total - now + nxt, True


def _metric(method, layer: ConvLayer, rank: Optional[Rank], metric: str) -> float:
    value = cost_of(method, layer, rank).metric(metric)
    if value is None:
        raise ValueError(f"the input size of '{layer.name}' is unknown, so its FLOPs are; "
                         "use target_metric: params or give the model fixed spatial sizes")
    return float(value)
