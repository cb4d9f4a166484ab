"""Which layers to decompose and at which rank: eligibility rules and FLOPs/params budgets (graph-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .layer import ChildSpec, ConvLayer, Cost, Rank, chain_cost

__all__ = ["RULES", "eligibility_problem", "Choice", "allocate", "cost_of", "macs_of"]

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


def macs_of(method, layer: ConvLayer, rank: Optional[Rank]) -> int:
    """Multiply-accumulates of the layer decomposed at ``rank`` (of the layer itself when rank is None)."""
    children: Sequence[ChildSpec] = [layer.as_child] if rank is None else method.structure(layer, rank)
    in_hw, total = layer.in_hw, 0
    if in_hw is None:
        raise ValueError(f"the input size of '{layer.name}' is unknown, so its FLOPs are; "
                         "use target_metric: params or give the model fixed spatial sizes")
    for child in children:
        out_h, out_w = child.out_hw(in_hw)
        kh, kw = child.kernel
        total += out_h * out_w * child.cout * (child.cin // child.group) * kh * kw
        in_hw = (out_h, out_w)
    return total


@dataclass(frozen=True)
class Choice:
    """A rank for a layer, or the reason no rank fits the budget."""

    rank: Optional[Rank]
    reason: str = ""


def allocate(method, free: Sequence[ConvLayer], fixed: Mapping[str, tuple[ConvLayer, Rank]], keep: float,
             metric: str) -> dict[str, Choice]:
    """Ranks for ``free`` layers so that all decomposed layers keep at most ``keep`` of ``metric``.

    The target is a bound: the layers actually decomposed (free and fixed ones, not those left alone)
    keep at most ``keep`` of their ``metric`` -- for FLOPs both as SPEC 8.2 counts them and as
    multiply-accumulates, which differ by the additions, so either count stays within the target.
    Each free layer first gets the largest rank within its own share (the budget left after the
    fixed ranks, spread evenly); the rounding slack then goes, a step at a time, to the most costly
    layers while the total stays within budget. Layers that cannot fit are left alone.
    """
    counts = ("flops", "macs") if metric == "flops" else (metric,)

    def cost(layer: ConvLayer, rank: Optional[Rank]) -> tuple[float, ...]:
        return tuple(_metric(method, layer, rank, c) for c in counts)

    before = {layer.name: cost(layer, None) for layer in free}
    fixed_before = _sum(cost(layer, None) for layer, _ in fixed.values())
    spent = _sum(cost(layer, rank) for layer, rank in fixed.values())
    free_before = _sum(before.values()) if before else (0.0,) * len(counts)
    budget = tuple(keep * (f + x) for f, x in zip(free_before, fixed_before))
    share = min((b - s) / f for b, s, f in zip(budget, spent, free_before)) if before else 0.0
    if free and share <= 0:
        raise ValueError(f"the explicit ranks alone keep {spent[0] / budget[0] * keep:.3f} of the {metric} "
                         f"of the decomposed layers, more than the target {keep:g}")
    candidates = {layer.name: method.candidate_ranks(layer) for layer in free}
    index: dict[str, int] = {}
    for layer in free:
        fits = [i for i, r in enumerate(candidates[layer.name])
                if all(c <= share * b for c, b in zip(cost(layer, r), before[layer.name]))]
        if fits:
            index[layer.name] = fits[-1]
    # the bound is over the layers decomposed: those left alone take their share of the budget with them
    kept = [layer for layer in free if layer.name in index]
    budget = tuple(keep * (f + x) - s for f, x, s in
                   zip(_sum(before[layer.name] for layer in kept) if kept else (0.0,) * len(counts), fixed_before, spent))
    _fit_budget(kept, candidates, index, budget, cost)
    _spend_slack(kept, candidates, index, budget, cost)
    return {layer.name: Choice(candidates[layer.name][index[layer.name]]) if layer.name in index else
            Choice(None, f"even the smallest rank keeps more than {share:.3f} of its {metric} (target {keep:g})")
            for layer in free}


def _sum(vectors) -> tuple[float, ...]:
    vectors = list(vectors)
    return tuple(map(sum, zip(*vectors))) if vectors else (0.0, 0.0)


def _total(layers, candidates, index, cost) -> list[float]:
    total = None
    for layer in layers:
        value = cost(layer, candidates[layer.name][index[layer.name]])
        total = list(value) if total is None else [t + v for t, v in zip(total, value)]
    return total or []


def _fit_budget(layers, candidates, index, budget, cost) -> None:
    """Lower ranks, costliest layers first, until every count is within budget (needed only when fixed
    ranks took more than their share)."""
    total = _total(layers, candidates, index, cost)
    while total and any(t > b for t, b in zip(total, budget)):
        lowerable = [layer for layer in layers if index[layer.name] > 0]
        if not lowerable:
            raise ValueError("the explicit ranks leave no room for the other layers within the target; "
                             "lower the explicit ranks or raise the target")
        layer = max(lowerable, key=lambda layer: cost(layer, candidates[layer.name][index[layer.name]])[0])
        index[layer.name] -= 1
        total = _total(layers, candidates, index, cost)


def _spend_slack(layers, candidates, index, budget, cost) -> None:
    """Raise ranks one step at a time, costliest layers first, while every count fits the budget."""
    layers = sorted(layers, key=lambda layer: -cost(layer, None)[0])
    total = _total(layers, candidates, index, cost)
    grown = True
    while grown and layers:
        grown = False
        for layer in layers:
            i = index[layer.name]
            if i + 1 >= len(candidates[layer.name]):
                continue
            now, nxt = cost(layer, candidates[layer.name][i]), cost(layer, candidates[layer.name][i + 1])
            new = [t - a + b for t, a, b in zip(total, now, nxt)]
            if all(n <= b for n, b in zip(new, budget)):
                index[layer.name], total, grown = i + 1, new, True


def _metric(method, layer: ConvLayer, rank: Optional[Rank], metric: str) -> float:
    if metric == "macs":
        return float(macs_of(method, layer, rank))
    value = cost_of(method, layer, rank).metric(metric)
    if value is None:
        raise ValueError(f"the input size of '{layer.name}' is unknown, so its FLOPs are; "
                         "use target_metric: params or give the model fixed spatial sizes")
    return float(value)
