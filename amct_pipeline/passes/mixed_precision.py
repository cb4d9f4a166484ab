"""mixed_precision: search per-layer precisions for the Pareto front of output quality against bitops.

Each layer may stay as asked (normally A8W8), be *raised* (INT16 activations where SPEC 6.1 allows:
Conv, Gemm, ConvTranspose; float for the other types) or *lowered* (INT4 weights). The search is
guided by the sensitivity analysis (artifact ``sensitivity`` from ``analyze`` with output effects,
else measured here): noise adds up roughly across layers, so a layer's own output noise (output
SQNR with only it quantized) per bitop it would cost orders the raises, and the least noise per
bitop saved orders the lowerings. Points are prefixes of the raise order, greedy fills of it within
bitops levels (1.05x-2x all-INT8, skipping layers that do not fit) and a few INT4 lowerings with such
fills, without repeats, each evaluated exactly in one onnxruntime session whose per-layer precision is set by its inputs (``algorithms.sensitivity.
SwitchModel``), at most ``max_evaluations`` of them, on the first ``max_samples`` samples.

Writes ``<model>_mixed_precision.json`` (every point, the Pareto front, each point's per-layer
precisions) and, with ``plot``, the front as a PNG. Artifact ``mixed_precision``; the graph and the
factors are unchanged (a chosen point becomes a pipeline through ``match_layers{precision: ...}``).
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field

from ..options import Options
from .base import Pass, PassResult, json_text

__all__ = ["MixedPrecisionPass", "MixedPrecisionOptions", "pareto_front"]


class MixedPrecisionOptions(Options):
    dataset: str = Field("calib", description="Dataset the points are measured on (its first max_samples samples).")
    max_samples: int = Field(32, ge=1, le=4096, description="Samples each point is measured on.")
    max_evaluations: int = Field(48, ge=2, le=1000, description="Points evaluated at most (one model run each).")
    allow_int4: bool = Field(True, description="Offer INT4 weights (ARQ, 4 bits) to the least sensitive layers.")
    allow_float: bool = Field(True, description="Raise layers without INT16 activations (MatMul, AveragePool) to float.")
    budget: Optional[float] = Field(1.2, gt=0, le=16, description="Report the best point within this many times "
                                                                  "the all-INT8 bitops.")
    output: Optional[str] = Field("{model}_mixed_precision.json", description="JSON written in the output directory.")
    plot: Optional[str] = Field("{model}_mixed_precision.png", description="Pareto PNG (needs matplotlib; null: none).")


class MixedPrecisionPass(Pass):
    name = "mixed_precision"
    summary = "Search per-layer precisions (INT16 acts, INT4 weights, float): Pareto front of output SQNR vs bitops."
    Options = MixedPrecisionOptions
    requires = frozenset({"layer_map", "act_quant", "weight_quant"})
    produces = frozenset({"mixed_precision"})
    references = {"dataset": "datasets"}
    writes = ("output", "plot")
    plots = ("plot",)

    def run(self, graph, ctx) -> PassResult:
        from ..reports.sensitivity import pareto_table, plot_pareto
        opts = self.options
        result = search(graph, ctx, opts)
        ctx.artifacts["mixed_precision"] = result
        if ctx.outputs.directory is not None:
            if opts.output:
                ctx.output_path(ctx.file_name(opts.output, "output")).write_text(json_text(result))
            if opts.plot:
                plot_pareto(result["points"], result["front"], result["reference_bitops"],
                            ctx.output_path(ctx.file_name(opts.plot, "plot")))
        best = result.get("best_within_budget")
        stats = {"evaluations": len(result["points"]), "front": len(result["front"])}
        if best:
            stats.update(best_sqnr_db=best["sqnr_db"], best_bitops_ratio=round(best["bitops"] / result["reference_bitops"], 4))
        report = pareto_table(result["front"], result["reference_bitops"])
        return PassResult(False, stats, report="mixed precision, Pareto front:\n" + report)


def pareto_front(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Points no other point beats on both bitops (fewer) and SQNR (higher), by bitops."""
    front, best = [], -float("inf")
    for p in sorted(points, key=lambda p: (p["bitops"], -p["sqnr_db"])):
        if p["sqnr_db"] > best:
            front.append(p)
            best = p["sqnr_db"]
    return front


def _active(config: dict) -> dict:
    """The layers a configuration quantizes (float ones are left out: the switch model's default)."""
    return {n: p for n, p in config.items() if p.act or p.wts}


def _schedule(count: int, steps: int) -> list[int]:
    """About ``steps`` prefix lengths in 0 .. count, dense at the start (most benefit per bitop)."""
    if count <= 0 or steps <= 1:
        return [0]
    values = {0, count}
    ratio = (count + 1) ** (1.0 / (steps - 1))
    for i in range(1, steps):
        values.add(min(count, max(1, round(ratio ** i) - 1)))
    return sorted(values)


def search(graph, ctx, opts: MixedPrecisionOptions) -> dict[str, Any]:
    from ..algorithms.sensitivity import (INT16_ACT_TYPES, OutputMeter, Precision, SwitchModel, analyze,
                                          chosen_variants, progress_bar, subset_feeds)
    from ..quant.cost import bitops
    from ..quant.math import arq, scale_offset_from_range
    from ..quant.weights import deconv_channel_view, dequantize_weight, effective_weight
    layer_map, act_quant, weight_quant = ctx.artifacts["layer_map"], ctx.artifacts["act_quant"], ctx.artifacts["weight_quant"]
    source = ctx.dataset(opts.dataset)
    analysis = ctx.artifacts.get("sensitivity")
    if not analysis or "sqnr_only_db" not in (analysis["layers"] or [{}])[0]:
        analysis = analyze(graph, source, layer_map, act_quant, weight_quant, max_samples=opts.max_samples,
                           progress=ctx.progress)
    rows = {r["name"]: r for r in analysis["layers"]}
    layers = [layer for layer in layer_map.layers() if layer.name in rows]
    variants = chosen_variants(graph, layers, act_quant, weight_quant)
    asked = {layer.name: Precision(act_quant[layer.name].num_bits,
                                   weight_quant[layer.name].num_bits if layer.weight is not None else None)
             for layer in layers}
    raise_to, lower_to = {}, {}
    for layer in layers:
        name, act = layer.name, act_quant[layer.name]
        if layer.op_type in INT16_ACT_TYPES and act.num_bits < 16:
            lo, hi = rows[name]["input_range"]
            variants[name].act[16] = scale_offset_from_range(lo, hi, 16, symmetric=act.offset == 0 and lo < 0)
            raise_to[name] = Precision(16, asked[name].wts)
        elif opts.allow_float:
            raise_to[name] = Precision(None, None)
        if opts.allow_int4 and layer.weight is not None and (asked[name].wts or 32) > 4:
            group = layer.group if layer.op_type == "ConvTranspose" else 1
            w = effective_weight(graph, layer)
            q = arq(deconv_channel_view(w, group), layer.channel_axis if weight_quant[name].scale.size > 1 else None, 4)
            from ..quant.weights import deconv_from_channel_view
            variants[name].wts[4] = dequantize_weight(deconv_from_channel_view(q.quantized, group), q.scale, layer)
            lower_to[name] = Precision(asked[name].act, 4)

    def cost(config) -> int:
        return sum(bitops(rows[n]["flops"], p.act, p.wts if layer_map[n].weight is not None else 1)
                   for n, p in config.items()) + sum(bitops(rows[n]["flops"], None, None) for n in rows if n not in config)

    reference = {n: Precision(8, 8 if layer_map[n].weight is not None else None) for n in rows}
    reference_bitops = cost(reference)
    noise = {n: 10 ** (-(rows[n]["sqnr_only_db"] if rows[n]["sqnr_only_db"] is not None else 200) / 10) for n in rows}

    def extra(name, target) -> float:
        return max(cost({name: target}) - cost({name: asked[name]}), 1)

    raises = sorted(raise_to, key=lambda n: (-noise[n] / extra(n, raise_to[n]), n))
    lowers = sorted(lower_to, key=lambda n: (noise[n] / -min(-1, cost({n: lower_to[n]}) - cost({n: asked[n]})), n))

    def make(raised: list[str], lowered: list[str]) -> dict:
        config = dict(asked)
        config.update((n, lower_to[n]) for n in lowered if n not in raised)
        config.update((n, raise_to[n]) for n in raised)
        return config

    def fill(budget: float, lowered: list[str]) -> list[str]:
        """Raise in order while the bitops stay within ``budget`` x all-INT8 (skipping what does not fit)."""
        config, raised = make([], lowered), []
        for n in raises:
            trial = dict(config, **{n: raise_to[n]})
            if cost(_active(trial)) <= budget * reference_bitops:
                config, raised = trial, raised + [n]
        return raised

    candidates = [make(raises[:k], []) for k in _schedule(len(raises), max(2, opts.max_evaluations // 2))]
    levels = sorted({1.05, 1.1, 1.15, 1.2, 1.25, 1.3, 1.5, 2.0} | ({opts.budget} if opts.budget else set()))
    candidates += [make(fill(b, []), []) for b in levels]
    for m in sorted({1, 3, max(1, len(lowers) // 8)} if lowers else set()):
        lowered = lowers[:m]
        candidates += [make([], lowered)] + [make(fill(b, lowered), lowered) for b in (1.0, opts.budget or 1.2)]
    plan, seen = [], set()
    for config in candidates:
        key = tuple(sorted((n, p.text()) for n, p in config.items()))
        if key not in seen:
            seen.add(key)
            plan.append(config)
    plan = plan[: opts.max_evaluations]

    model = SwitchModel(graph, layers, {n: v for n, v in variants.items()})
    session = model.session()
    meter = OutputMeter(graph.to_proto(), subset_feeds(graph, source, opts.max_samples))
    points = []
    with progress_bar(ctx.progress, len(plan), "mixed_precision") as bar:
        for config in plan:
            measured = meter.measure(session, model.feed(_active(config)))
            changes = {n: p.text() for n, p in config.items() if p != asked[n]}
            raised = sum(1 for n in changes if config[n] == raise_to.get(n))
            lowered = len(changes) - raised
            points.append({"label": f"raise {raised}, int4 {lowered}", "raised": raised, "lowered": lowered,
                           "bitops": cost(_active(config)), **measured, "precision": changes})
            bar.update(1)
    front = pareto_front(points)
    result = {"model": ctx.model_name, "samples": meter.samples, "reference": "all layers A8W8",
              "reference_bitops": reference_bitops, "asked_bitops": cost(asked), "points": points, "front": front,
              "raise_order": raises, "lower_order": lowers}
    if opts.budget is not None:
        within = [p for p in points if p["bitops"] <= opts.budget * reference_bitops]
        result["budget"] = opts.budget
        result["best_within_budget"] = max(within, key=lambda p: p["sqnr_db"]) if within else None
    return result
