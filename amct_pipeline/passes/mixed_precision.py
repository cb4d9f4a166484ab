"""mixed_precision: search per-layer precisions for the Pareto front of output quality against bitops.

Each layer may stay as asked (normally A8W8), be *raised* (INT16 activations where SPEC 6.1 allows:
Conv, Gemm, ConvTranspose; float for the other types) or *lowered* (INT4 weights, ARQ). Noise does
not add up across layers exactly, so the gains are measured where the search works: from the point
as asked, each layer's each alternative is one run (the noise it removes or adds, ``moves``); a
multiple-choice knapsack (Lagrangian: per layer the alternative with the most noise removed minus
``lambda`` x bitops added, ``lambda`` bisected to the bitops limit, then a greedy fill by noise per
bitop) gives a point per bitops level; at ``budget`` the moves are measured again around that point
(``relinearize``), the knapsack solved with those gains, and the point refined by swaps (drop the weakest
pick, fill again), each measured. Every point is one run of one onnxruntime session whose per-layer
precision is set by its inputs (``algorithms.sensitivity.SwitchModel``), at most
``max_evaluations`` of them, on the first ``max_samples`` samples.

The graph's outputs are the reference (with the float values of the constants earlier passes replaced,
bias correction's biases and retraining's weights, put back: ``float_reference``) unless ``reference``
names the float model: give it after anything else that changes the function on purpose, else the
search measures against the changed graph. INT16 activations are measured on the calibration
data's full range (``analyze``'s ``input_range``); the chosen point's ``best_match_layers`` gives
``match_layers`` options with ``calibrate{algorithm: minmax}`` for them.

Bitops follow SPEC 8.2 (``FLOPs x act_bits x wts_bits``, ``quant.cost``). SPEC names no width for a
float layer: a float side counts 32 bits, the FP32 operand it is (not the 16 of an FP16 deployment,
which would make float layers look cheaper than INT16 ones); a weightless layer's weight side 1 bit.

Writes ``<model>_mixed_precision.json`` (every point, the Pareto front, each point's per-layer
precisions, the measured moves) and, with ``plot``, the front as a PNG. Artifact
``mixed_precision``; the graph and the factors are unchanged.
"""
from __future__ import annotations

from typing import Any, Optional

from pydantic import Field, field_validator

from ..options import Options
from .base import Pass, PassResult, float_reference, json_text

__all__ = ["MixedPrecisionPass", "MixedPrecisionOptions", "pareto_front"]

BITOPS_RULE = "SPEC 8.2 FLOPs x act_bits x wts_bits; a float side counts 32 bits, a weightless layer's weight side 1"


class MixedPrecisionOptions(Options):
    dataset: str = Field("calib", description="Dataset the points are measured on (its first max_samples samples).")
    max_samples: int = Field(16, ge=1, le=4096, description="Samples each point is measured on.")
    max_evaluations: int = Field(160, ge=2, le=2000, description="Points evaluated at most (one model run each): "
                                                                 "1 + one per layer alternative + levels + refine.")
    allow_int4: bool = Field(True, description="Offer INT4 weights (ARQ, 4 bits) as a way to free bitops.")
    allow_float: bool = Field(True, description="Raise layers without INT16 activations (MatMul, AveragePool) to float.")
    budget: Optional[float] = Field(1.2, gt=0, le=16, description="Report (and refine) the best point within this "
                                                                  "many times the all-INT8 bitops.")
    levels: list[float] = Field(default_factory=lambda: [1.05, 1.1, 1.15, 1.3, 1.5, 2.0], max_length=32,
                                description="Other bitops limits (x all-INT8) a knapsack point is measured at.")
    relinearize: int = Field(1, ge=0, le=4, description="Rounds that measure every move again at the budget's "
                                                          "point and solve the knapsack with those gains.")
    refine: int = Field(24, ge=0, le=500, description="Evaluations spent on swaps at the budget.")
    reference: Optional[str] = Field(None, description="Float ONNX model whose outputs the points are measured "
                                                       "against (default: the graph as it reaches the pass); give "
                                                       "the original model when bias correction ran before.")
    output: Optional[str] = Field("{model}_mixed_precision.json", description="JSON written in the output directory.")
    plot: Optional[str] = Field("{model}_mixed_precision.png", description="Pareto PNG (needs matplotlib; null: none).")

    @field_validator("levels")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not 0 < v <= 16 for v in values):
            raise ValueError("levels are bitops ratios in (0, 16]")
        return values


class MixedPrecisionPass(Pass):
    name = "mixed_precision"
    summary = "Search per-layer precisions (INT16 acts, INT4 weights, float): Pareto front of output SQNR vs bitops."
    Options = MixedPrecisionOptions
    requires = frozenset({"layer_map", "act_quant", "weight_quant"})
    produces = frozenset({"mixed_precision"})
    references = {"dataset": "datasets"}
    writes = ("output", "plot")
    reads = ("reference",)
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


def _noise(point: dict) -> float:
    """Relative output error power of a measured point (its SQNR back to linear)."""
    db = point["sqnr_db"]
    return 0.0 if db is None or db == float("inf") else 10 ** (-db / 10)


def _reference(graph, ctx, path: Optional[str]):
    """The model whose outputs are the truth: ``reference`` (same inputs and outputs), else the graph
    as the float model had it (``float_reference``)."""
    if path is None:
        return float_reference(graph, ctx).to_proto()
    from pathlib import Path

    from ..errors import ConfigError
    from ..ir.io import read_model
    model = read_model(Path(path))
    have, want = [o.name for o in model.graph.output], [o.name for o in graph.gs.outputs]
    inputs = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
    if have != want or not inputs <= {i.name for i in graph.gs.inputs}:
        raise ConfigError(f"mixed_precision.reference '{path}': its inputs {sorted(inputs)} / outputs {have} are not "
                          f"the model's ({sorted(i.name for i in graph.gs.inputs)} / {want}); give the float model "
                          "the pipeline started from")
    return model


def _key(config: dict) -> tuple:
    return tuple(sorted((n, p.text()) for n, p in config.items()))


class _Space:
    """The precisions each layer may take, their fake-quant variants and what a configuration costs."""

    def __init__(self, graph, layers, rows, act_quant, weight_quant, opts: MixedPrecisionOptions) -> None:
        from ..algorithms.sensitivity import INT16_ACT_TYPES, Precision, chosen_variants
        from ..quant.math import scale_offset_from_range
        self.rows = rows
        self.weighted = {layer.name: layer.weight is not None for layer in layers}
        self.variants = chosen_variants(graph, layers, act_quant, weight_quant)
        self.asked = {layer.name: Precision(act_quant[layer.name].num_bits,
                                            weight_quant[layer.name].num_bits if layer.weight is not None else None)
                      for layer in layers}
        self.raise_to, self.lower_to = {}, {}
        for layer in layers:
            name, act, asked = layer.name, act_quant[layer.name], self.asked[layer.name]
            if layer.op_type in INT16_ACT_TYPES and act.num_bits < 16:
                lo, hi = rows[name]["input_range"]
                self.variants[name].act[16] = scale_offset_from_range(lo, hi, 16, symmetric=act.offset == 0 and lo < 0)
                self.raise_to[name] = Precision(16, asked.wts)
            elif opts.allow_float:
                self.raise_to[name] = Precision(None, None)
            if opts.allow_int4 and layer.weight is not None and (asked.wts or 32) > 4:
                self.variants[name].wts[4] = _int4_weight(graph, layer, weight_quant[name])
                self.lower_to[name] = Precision(asked.act, 4)
        self.reference_bitops = self.cost({n: Precision(8, 8 if self.weighted[n] else None) for n in rows})

    def cost(self, config: dict) -> int:
        """Bitops per sample; a layer the configuration does not name counts as float."""
        from ..quant.cost import bitops
        total = 0
        for name, row in self.rows.items():
            p = config.get(name)
            act, wts = (None, None) if p is None else (p.act, p.wts)
            total += bitops(row["flops"], act, wts if self.weighted[name] else 1)
        return total

    def alternatives(self, name: str) -> list:
        return [c for c in (self.raise_to.get(name), self.lower_to.get(name)) if c is not None]

    def point(self, config: dict, measured: dict) -> dict:
        changes = {n: p.text() for n, p in config.items() if p != self.asked[n]}
        raised = sum(1 for n in changes if config[n] == self.raise_to.get(n))
        lowered = len(changes) - raised
        return {"label": f"raise {raised}, int4 {lowered}", "raised": raised, "lowered": lowered,
                "bitops": self.cost(_active(config)), **measured, "precision": changes}

    def marginal_moves(self, base: dict, evaluate, around: Optional[dict] = None) -> list[tuple]:
        """(layer, precision, noise removed, bitops added) of every single change, each measured: from
        the point as asked, or with ``around`` (a configuration, ``base`` its measurement) as the point
        the gains are taken at (a move ``around`` holds: the noise its removal adds back). Moves left
        when the evaluations run out are not offered."""
        center = around or self.asked
        moves = []
        for name in self.asked:
            for choice in self.alternatives(name):
                held = center[name] == choice
                trial = evaluate(dict(center, **{name: self.asked[name] if held else choice}))
                if trial is None:
                    return moves
                gain = _noise(trial) - _noise(base) if held else _noise(base) - _noise(trial)
                moves.append((name, choice, gain,
                              self.cost(_active({name: choice})) - self.cost(_active({name: self.asked[name]}))))
        return moves

    def choose(self, moves: list[tuple], level: float, exclude: frozenset = frozenset()) -> dict:
        """The knapsack point within ``level`` x all-INT8 bitops: per layer the move with the most
        noise removed minus ``lambda`` x bitops added (lambda bisected to the limit), then a greedy
        fill of what still fits, best noise removed per bitop first."""
        limit = level * self.reference_bitops - self.cost(_active(self.asked))
        moves = [m for m in moves if (m[0], m[1].text()) not in exclude]

        def pick(lam: float) -> dict:
            best: dict = {}
            for name, choice, gain, added in moves:
                value = gain - lam * added
                if value > 0 and value > best.get(name, (None, 0.0, 0))[1]:
                    best[name] = (choice, value, added)
            return best

        lo, hi = 0.0, 1.0
        while sum(a for _, _, a in pick(hi).values()) > limit and hi < 1e30:
            hi *= 4
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if sum(a for _, _, a in pick(mid).values()) > limit else (lo, mid)
        chosen = {n: (c, a) for n, (c, _, a) in pick(hi).items()}
        used = sum(a for _, a in chosen.values())
        for name, choice, gain, added in sorted(moves, key=lambda m: (-m[2] / max(m[3], 1), m[0])):
            if name in chosen or gain <= 0 or used + added > limit:
                continue
            chosen[name] = (choice, added)
            used += added
        config = dict(self.asked)
        config.update((n, c) for n, (c, _) in chosen.items())
        return config

    def match_layers_options(self, changes: dict) -> dict:
        """``match_layers`` options that build a point: precision per layer, and the calibration's
        full range (``minmax``) for INT16 activations, as the search measured them."""
        precision, overrides = {}, []
        for name, text in sorted(changes.items()):
            if text == "float":
                precision[name] = "float"
                continue
            act, _, wts = text[1:].partition("W")
            entry = {}
            if act != "f" and int(act) != self.asked[name].act:
                entry["act"] = int(act)
            if wts not in ("f", "None") and self.asked[name].wts is not None and int(wts) != self.asked[name].wts:
                entry["wts"] = int(wts)
            precision[name] = entry
            if entry.get("act") == 16:
                overrides.append({"match": {"name": name}, "options": {"calibrate": {"algorithm": "minmax"}}})
        return {"precision": precision, "overrides": overrides}


def _int4_weight(graph, layer, params):
    """The layer's weight fake-quantized to 4 bits by ARQ (per channel when the asked one is)."""
    from ..quant.math import arq
    from ..quant.weights import deconv_channel_view, deconv_from_channel_view, dequantize_weight, effective_weight
    group = layer.group if layer.op_type == "ConvTranspose" else 1
    q = arq(deconv_channel_view(effective_weight(graph, layer), group),
            layer.channel_axis if params.scale.size > 1 else None, 4)
    return dequantize_weight(deconv_from_channel_view(q.quantized, group), q.scale, layer)


def _refine(space: _Space, moves: list[tuple], budget: float, rounds: int, evaluate, points: dict) -> None:
    """Swaps at the budget: drop one more of the best point's picks (weakest noise per bitop first) and
    fill the freed bitops again; a better measured point becomes the one to improve."""
    limit = budget * space.reference_bitops
    ratio = {(n, c.text()): g / max(d, 1) for n, c, g, d in moves}
    dropped = {_key(space.choose(moves, budget)): frozenset()}    # point -> the moves left out to reach it
    for _ in range(rounds):
        within = [k for k, p in points.items() if p["bitops"] <= limit and k in dropped]
        if not within:
            return
        best = max(within, key=lambda k: points[k]["sqnr_db"])
        picks = sorted(((n, t) for n, t in points[best]["precision"].items() if (n, t) in ratio),
                       key=lambda k: (ratio[k], k))
        trial = None
        for pick in picks:
            config = space.choose(moves, budget, exclude=dropped[best] | {pick})
            if _key(config) not in dropped:
                dropped[_key(config)] = dropped[best] | {pick}
                trial = config
                break
        if trial is None or evaluate(trial) is None:
            return


def search(graph, ctx, opts: MixedPrecisionOptions) -> dict[str, Any]:
    from ..algorithms.sensitivity import OutputMeter, SwitchModel, analyze, progress_bar, subset_feeds
    layer_map, act_quant, weight_quant = ctx.artifacts["layer_map"], ctx.artifacts["act_quant"], ctx.artifacts["weight_quant"]
    source = ctx.dataset(opts.dataset)
    analysis = ctx.artifacts.get("sensitivity")
    if not analysis or not analysis.get("layers"):
        analysis = analyze(graph, source, layer_map, act_quant, weight_quant, max_samples=opts.max_samples,
                           output_effects=False, progress=ctx.progress)
    rows = {r["name"]: r for r in analysis["layers"]}
    layers = [layer for layer in layer_map.layers() if layer.name in rows]
    space = _Space(graph, layers, rows, act_quant, weight_quant, opts)
    model = SwitchModel(graph, layers, space.variants)
    session = model.session()
    meter = OutputMeter(_reference(graph, ctx, opts.reference), subset_feeds(graph, source, opts.max_samples))
    points: dict[tuple, dict] = {}
    bar = progress_bar(ctx.progress, opts.max_evaluations, "mixed_precision")

    def evaluate(config: dict) -> Optional[dict]:
        """Measure ``config`` once (a repeat is free); None when the evaluations are used up."""
        key = _key(config)
        if key not in points:
            if len(points) >= opts.max_evaluations:
                return None
            measured = meter.measure(session, model.feed(_active(config)))
            points[key] = space.point(config, measured)
            bar.update(1)
        return points[key]

    with bar:
        base = evaluate(space.asked)
        moves = space.marginal_moves(base, evaluate)
        limits = sorted(set(opts.levels) | ({opts.budget} if opts.budget else set()))
        for level in limits:
            evaluate(space.choose(moves, level))
        if opts.budget is not None:
            for _ in range(opts.relinearize):      # noise does not add up: gains where the point is
                center = space.choose(moves, opts.budget)
                again = space.marginal_moves(evaluate(center), evaluate, around=center)
                if len(again) < len(moves) or evaluate(space.choose(again, opts.budget)) is None:
                    break
                moves = again
            _refine(space, moves, opts.budget, opts.refine, evaluate, points)
    found = list(points.values())
    front = pareto_front(found)
    result = {"model": ctx.model_name, "samples": meter.samples, "reference": "all layers A8W8",
              "reference_bitops": space.reference_bitops, "asked_bitops": space.cost(space.asked),
              "bitops_rule": BITOPS_RULE, "points": found, "front": front,
              "moves": [{"layer": n, "precision": p.text(), "noise_removed": g, "bitops_added": d}
                        for n, p, g, d in moves]}
    if opts.budget is not None:
        within = [p for p in found if p["bitops"] <= opts.budget * space.reference_bitops]
        best = max(within, key=lambda p: p["sqnr_db"]) if within else None
        result["budget"] = opts.budget
        result["best_within_budget"] = best
        if best is not None:
            result["best_match_layers"] = space.match_layers_options(best["precision"])
    return result
