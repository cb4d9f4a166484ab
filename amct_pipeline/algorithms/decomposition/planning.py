"""Which layers to decompose and at which rank: eligibility rules and FLOPs/params budgets (graph-free)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

from .layer import ChildSpec, ConvLayer, Cost, Rank, chain_cost

__all__ = ["RULES", "eligibility_problem", "Choice", "Candidate", "allocate", "cost_of", "macs_of", "cost_counts",
           "layer_costs", "shrinking_ranks"]

RULES = ("basic", "amct")


def eligibility_problem(layer: ConvLayer, rules: str, min_in_channels: int = 1) -> Optional[str]:
    """Why the layer cannot be decomposed, or None.

    "basic" is the seed's rule (group 1, dilation 1, kernel_h = kernel_w > 2); "amct" adds AMCT's
    internal checks (SPEC 7): stride <= 2, k·min(Cin, Cout) >= 16, and k >= 7 or min(Cin, Cout) >= 64.
    Under either, a layer reading fewer than ``min_in_channels`` channels is left alone: a low rank
    there saves little (the first conv of an image model) and costs much accuracy.
    """
    kh, kw = layer.kernel
    if layer.cin < min_in_channels:
        return f"input has {layer.cin} channel(s) (< min_in_channels {min_in_channels})"
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


@dataclass(frozen=True)
class Candidate:
    """One way to decompose a layer: its rank, its cost by every count, its relative output error."""

    rank: Rank
    costs: tuple[float, ...]
    error: float


def cost_counts(metric: str) -> tuple[str, ...]:
    """The counts a target bounds: FLOPs both as SPEC 8.2 counts them and as multiply-accumulates
    (they differ by the additions, so either count stays within the target), or params."""
    return ("flops", "macs") if metric == "flops" else (metric,)


def layer_costs(method, layer: ConvLayer, rank: Optional[Rank], metric: str) -> tuple[float, ...]:
    return tuple(_metric(method, layer, rank, count) for count in cost_counts(metric))


def shrinking_ranks(method, layer: ConvLayer, metric: str, limit: int) -> list[tuple[Rank, tuple[float, ...]]]:
    """At most ``limit`` candidate ranks that make the layer cheaper by every count (never one that
    grows it), spread evenly over the cost range, cheapest first."""
    before = layer_costs(method, layer, None, metric)
    ranks = [(rank, layer_costs(method, layer, rank, metric)) for rank in method.candidate_ranks(layer)]
    ranks = sorted((r for r in ranks if all(c < b for c, b in zip(r[1], before))), key=lambda r: r[1])
    if len(ranks) <= limit:
        return ranks
    picks = sorted({round(i * (len(ranks) - 1) / (limit - 1)) for i in range(limit)})
    return [ranks[i] for i in picks]


def allocate(curves: Mapping[str, Sequence[Candidate]], before: Mapping[str, tuple[float, ...]],
             fixed_before: tuple[float, ...], fixed_spent: tuple[float, ...], keep: float,
             metric: str) -> dict[str, Choice]:
    """Share a global target out by sensitivity: which layers to decompose and at which rank.

    The bound: every layer considered (free ones, left whole or not, plus those with explicit ranks)
    keeps at most ``keep`` of its total cost, by every count. Greedy on the error/cost trade-off:
    starting from all layers whole, repeatedly take the move (a layer to any cheaper candidate)
    that adds the least relative output error per unit of cost saved, until the bound holds; then
    spend the slack, taking back the moves that lower the error most while the bound still holds.
    The error of a model is taken as the sum of its layers' relative output errors (noise powers
    add). A layer no move reaches stays whole.
    """
    total_before = _add(_sum(before.values(), len(fixed_before)), fixed_before)
    budget = tuple(keep * t - s for t, s in zip(total_before, fixed_spent))
    state: dict[str, Optional[int]] = {name: None for name in curves}       # None: the layer stays whole

    def point(name: str, index: Optional[int]) -> tuple[tuple[float, ...], float]:
        return (before[name], 0.0) if index is None else (curves[name][index].costs, curves[name][index].error)

    total = list(_sum(before.values(), len(fixed_before)))
    while any(t > b for t, b in zip(total, budget)):
        move = _cheapest_move(curves, state, point)
        if move is None:
            smallest = _sum([min((c.costs for c in curves[n]), default=before[n]) for n in curves], len(budget))
            reached = (smallest[0] + fixed_spent[0]) / total_before[0] if total_before[0] else 1.0
            raise ValueError(f"the target {keep:g} cannot be met: even the smallest ranks keep {reached:.3f} of "
                             f"the {metric} of the layers considered; raise the target or lower explicit ranks")
        name, index = move
        total = [t - a + b for t, a, b in zip(total, point(name, state[name])[0], point(name, index)[0])]
        state[name] = index
    _spend_slack(curves, state, point, total, budget)
    return {name: Choice(curves[name][index].rank) if index is not None else
            Choice(None, "kept whole by the sensitivity allocation (its output error per FLOP saved is higher "
                         f"than the other layers'; target {keep:g} met without it)")
            for name, index in state.items()}


def _cheapest_move(curves, state, point) -> Optional[tuple[str, int]]:
    """(layer, candidate) adding the least error per unit of (first-count) cost saved."""
    best, best_ratio = None, float("inf")
    for name in sorted(curves):
        cost, error = point(name, state[name])
        for index, candidate in enumerate(curves[name]):
            saved = cost[0] - candidate.costs[0]
            if saved <= 0:
                continue
            ratio = max(candidate.error - error, 0.0) / saved
            if ratio < best_ratio:
                best, best_ratio = (name, index), ratio
    return best


def _spend_slack(curves, state, point, total: list[float], budget) -> None:
    """While some layer can move to a costlier, more accurate point within budget, take the move
    that lowers the error most (each step lowers the total error, so this ends; gains below 1e-9,
    rounding noise, buy nothing)."""
    for _ in range(10_000):
        best, gain = None, 0.0
        for name in sorted(curves):
            cost, error = point(name, state[name])
            for index in [None, *range(len(curves[name]))]:
                new_cost, new_error = point(name, index)
                after = [t - a + b for t, a, b in zip(total, cost, new_cost)]
                if error - new_error > max(gain, 1e-9) and all(a <= b for a, b in zip(after, budget)):
                    best, gain = (name, index, after), error - new_error
        if best is None:
            return
        name, index, total[:] = best
        state[name] = index


def _sum(vectors, width: int) -> tuple[float, ...]:
    vectors = list(vectors)
    return tuple(map(sum, zip(*vectors))) if vectors else (0.0,) * width


def _add(a, b) -> tuple[float, ...]:
    return tuple(x + y for x, y in zip(a, b))


def _metric(method, layer: ConvLayer, rank: Optional[Rank], metric: str) -> float:
    if metric == "macs":
        return float(macs_of(method, layer, rank))
    value = cost_of(method, layer, rank).metric(metric)
    if value is None:
        raise ValueError(f"the input size of '{layer.name}' is unknown, so its FLOPs are; "
                         "use target_metric: params or give the model fixed spatial sizes")
    return float(value)
