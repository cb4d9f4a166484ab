"""decompose: replace Conv layers by chains of cheaper child convs (SPEC 7), data-free or data-aware.

Methods are registered algorithms (``spatial_svd``, ``tucker2``, ``cp``; plugins may add more). The
pass chooses layers (eligibility rules, ``min_in_channels``, include/exclude, every refusal reported
with its reason; a run that decomposes nothing warns with the reason counts), ranks (explicit per
layer, the method's rule, or a global FLOPs/params target shared out by sensitivity: each layer's
relative output error at a few candidate ranks, under its input channel covariance when there is
data, against the cost it saves, allocated greedily by ``planning.allocate``; a rank that would
grow a layer is never a candidate), then rewrites:

* data-free: the children come from the weights alone;
* data-aware: with a calibration dataset, layers are decomposed one after the other; each uses the
  covariance of the inputs it receives in the partly decomposed model (input whitening), then its
  last child is refit by least squares against the float layer's output (see
  ``algorithms.decomposition.stats``).

Outputs: the decomposed graph; ``<model>_decompose_info.json`` (AMCT's info shape, see
``algorithms.decomposition.info``) when there is an output directory; the ``decomposition`` artifact
(info, report, AMCT-style ``changes``); a report table on the terminal; optionally a JSON report and
a PNG of output SQNR versus FLOPs kept.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from pydantic import Field, field_validator, model_validator

from ..algorithms.decomposition import info as info_file
from ..algorithms.decomposition.convs import bias_of, conv_layer, replace_conv, spatial_shapes, weight_of
from ..algorithms.decomposition.layer import ChildSpec, ConvLayer, Rank, compose_kernels, relative_error
from ..algorithms.decomposition.planning import (Candidate, allocate, cost_of, eligibility_problem, layer_costs,
                                                 shrinking_ranks)
from ..algorithms.decomposition.sampling import CalibrationData, sqnr_db
from ..algorithms.decomposition.stats import (CovarianceAccumulator, LeastSquaresRefit, gather_patches,
                                              sample_positions)
from ..errors import ConfigError, Problem
from ..options import Options, suggest
from ..reports.decomposition import DecompositionReport, LayerReport
from .base import Pass, PassResult

__all__ = ["DecomposePass", "DecomposeOptions", "Decomposition", "conv_layer", "replace_conv", "spatial_shapes",
           "weight_of", "bias_of"]

WHERE = "pass 'decompose'"


# -- options -----------------------------------------------------------------------------------
class DecomposeOptions(Options):
    method: str = Field("tucker2", description="Decomposition method (see `amct-pipeline list decompositions`).")
    method_options: dict[str, Any] = Field(default_factory=dict, description="Options of the method.")
    rules: Optional[Literal["basic", "amct"]] = Field(
        None, description="Eligibility: 'basic' = group 1, dilation 1, kernel_h = kernel_w > 2; 'amct' adds "
                          "stride <= 2, k·min(Cin,Cout) >= 16, k >= 7 or min(Cin,Cout) >= 64. Default: the "
                          "method's preference (spatial_svd: amct, others: basic).")
    include: list[str] = Field(default_factory=list, description="Only these Conv layers (default: all eligible); "
                                                                  "naming an ineligible layer is an error.")
    exclude: list[str] = Field(default_factory=list, description="Conv layers to leave alone.")
    ranks: dict[str, Union[int, list[int]]] = Field(
        default_factory=dict, description="Per-layer rank: spatial_svd/cp an int, tucker2 [rank_in, rank_out] "
                                          "(an int sets both). Named layers are decomposed.")
    target: Optional[float] = Field(None, description="Fraction (0, 1] of the FLOPs (or params) of the layers "
                                                      "considered to keep, shared out by sensitivity (each layer's "
                                                      "output error against the cost it saves; layers may stay "
                                                      "whole); default: method rule.")
    target_metric: Literal["flops", "params"] = Field("flops", description="What target counts.")
    require_reduction: bool = Field(True, description="Leave a layer alone when its rank (from the rule) "
                                                      "would not reduce FLOPs (params when sizes are unknown).")
    min_in_channels: int = Field(8, ge=1, le=4096, description="Leave layers reading fewer input channels alone "
                                                               "(an image model's first conv): little to save, "
                                                               "much accuracy to lose. 1: no such rule.")
    sensitivity_ranks: int = Field(12, ge=2, le=64, description="Candidate ranks per layer whose output error "
                                                                "the target allocation measures (each costs one "
                                                                "decomposition of the layer).")
    data_aware: bool = Field(False, description="Minimise each layer's response error on 'dataset' (input "
                                                "whitening + least-squares refit of the last child).")
    dataset: Optional[str] = Field(None, description="Calibration dataset: needed by data_aware and plot; "
                                                     "when given, the report has the model output SQNR on it.")
    num_batches: Optional[int] = Field(None, gt=0, description="Use at most this many batches of the dataset.")
    samples_per_image: int = Field(2048, gt=0, description="Positions sampled per image for the statistics.")
    info_file: Optional[str] = Field("{model}_decompose_info.json",
                                     description="Info file written in the output directory when a layer "
                                                 "was decomposed (null: none).")
    report: bool = Field(True, description="Print the report table on the terminal (not in quiet runs).")
    report_file: Optional[str] = Field(None, description="Also write the report as JSON (e.g. "
                                                         "'{model}_decompose_report.json').")
    plot: Optional[str] = Field(None, description="Write a PNG of output SQNR vs FLOPs kept, sweeping "
                                                  "plot_targets (needs dataset and matplotlib).")
    plot_targets: list[float] = Field(default_factory=lambda: [0.15, 0.25, 0.4, 0.6, 0.8], max_length=16,
                                      description="Targets the plot sweeps (besides the chosen point; each "
                                                  "costs one more decomposition and evaluation).")

    @field_validator("target")
    @classmethod
    def _target_range(cls, value: Optional[float]) -> Optional[float]:
        if value is not None and not (0 < value <= 1):
            raise ValueError(f"target must be in (0, 1] (the fraction of FLOPs or params to keep), got {value}")
        return value

    @field_validator("plot_targets")
    @classmethod
    def _plot_range(cls, values: list[float]) -> list[float]:
        bad = [v for v in values if not 0 < v <= 1]
        if bad:
            raise ValueError(f"plot_targets must be in (0, 1], got {bad}")
        return values

    @model_validator(mode="after")
    def _needs_data(self) -> "DecomposeOptions":
        for flag in ("data_aware", "plot"):
            if getattr(self, flag) and self.dataset is None:
                raise ValueError(f"{flag} needs a calibration dataset: set dataset: NAME")
        clash = sorted(set(self.exclude) & (set(self.include) | set(self.ranks)))
        if clash:
            raise ValueError(f"layer(s) {clash} are both excluded and included/ranked")
        return self


# -- the artifact ------------------------------------------------------------------------------
@dataclass
class Decomposition:
    """What ``decompose`` leaves in ``ctx.artifacts['decomposition']``."""

    info: dict[str, Any]                                   # the info file's content
    report: DecompositionReport
    changes: dict[str, list[str]] = field(default_factory=dict)   # AMCT: layer -> child names


@dataclass
class _Item:
    node: gs.Node
    layer: ConvLayer
    rank: Rank
    children: list[ChildSpec]
    names: list[str] = field(default_factory=list)    # child node names, once rewritten


# -- the pass ----------------------------------------------------------------------------------
class DecomposePass(Pass):
    name = "decompose"
    summary = ("Decompose Conv layers (spatial_svd / tucker2 / cp) into cheaper child convs; rank rules, "
               "targets, data-aware refit; AMCT info file and a report.")
    Options = DecomposeOptions
    produces = frozenset({"decomposition"})
    references = {"method": "decompositions", "dataset": "datasets"}
    changes_layers = True
    plots = ("plot",)

    def run(self, graph, ctx) -> PassResult:
        opts = self.options
        if "layer_map" in ctx.artifacts:
            raise ConfigError([Problem(WHERE, "", "decompose replaces layers that 'layer_map' already names",
                                       "put decompose before match_layers")])
        method = ctx.session.make_algorithm("decompositions", opts.method, opts.method_options)
        original = graph.to_proto() if opts.plot else None
        data = self._data(graph, ctx) if opts.dataset else None
        items, skipped = make_plan(graph, method, opts, data, seed=ctx.seed)
        if not items:
            warnings.warn(nothing_decomposed(skipped), UserWarning, stacklevel=2)
        report = decompose_graph(graph, items, method, opts, data, seed=ctx.seed)
        report.skipped = skipped
        result = Decomposition(self._info(method, items), report, {i.layer.name: list(i.names) for i in items})
        self._write(ctx, result, method, original, data)
        ctx.artifacts["decomposition"] = result
        return PassResult(bool(items), _stats(report), report=report.table() if opts.report else "")

    def _data(self, graph, ctx) -> CalibrationData:
        from ..runtime.data import model_inputs
        return CalibrationData(ctx.dataset(self.options.dataset), model_inputs(graph), self.options.num_batches)

    def _info(self, method, items: list[_Item]) -> dict[str, Any]:
        return {i.layer.name: info_file.info_entry(i.layer, method.name, method.mode(i.layer), i.rank, i.children,
                                                   i.names)
                for i in items}

    def _write(self, ctx, result: Decomposition, method, original, data) -> None:
        opts = self.options
        if ctx.outputs.directory is None:
            return
        if opts.info_file and result.info:
            path = ctx.output_path(opts.info_file.format(model=ctx.model_name))
            path.write_text(json.dumps(result.info, indent=2) + "\n")
        if opts.report_file:
            path = ctx.output_path(opts.report_file.format(model=ctx.model_name))
            path.write_text(json.dumps(result.report.to_json(), indent=2) + "\n")
        if opts.plot:
            _plot(ctx, opts, method, original, data, result.report)


def _stats(report: DecompositionReport) -> dict[str, Any]:
    stats: dict[str, Any] = {"decomposed": len(report.layers), "skipped": dict(report.skipped),
                             "ranks": {layer.name: list(layer.rank) for layer in report.layers}}
    if report.flops_reduction is not None:
        stats["flops_reduction"] = round(report.flops_reduction, 3)
    if report.output_sqnr_db is not None:
        stats["output_sqnr_db"] = round(report.output_sqnr_db, 2)
    return stats


# -- planning ----------------------------------------------------------------------------------
def _problem(path: str, message: str, hint: str = "") -> ConfigError:
    return ConfigError([Problem(WHERE, path, message, hint)])


def _check_names(opts: DecomposeOptions, convs: dict[str, Any], ops: dict[str, str]) -> None:
    """Every named layer must be a Conv; include/ranks must name eligible ones (error says why not)."""
    named = [("include", n) for n in opts.include] + [("exclude", n) for n in opts.exclude] + \
            [(f"ranks.{n}", n) for n in opts.ranks]
    for path, name in named:
        if name not in ops:
            raise _problem(path, f"no layer named '{name}' in the model",
                           suggest(name, list(convs)) or f"Conv layers: {', '.join(list(convs)[:8]) or 'none'}")
        if ops[name] != "Conv":
            raise _problem(path, f"'{name}' is a {ops[name]}, not a Conv layer")
        if not path.startswith("exclude") and isinstance(convs[name], str):
            raise _problem(path, f"'{name}' cannot be decomposed: {convs[name]}")


def nothing_decomposed(skipped: dict[str, str]) -> str:
    """The warning of a run that decomposed nothing: how many Conv layers were left alone, per reason."""
    import re
    if not skipped:
        return "decompose: no layer was decomposed: the model has no Conv layer"
    groups: dict[str, list[str]] = {}            # reasons that differ only in their numbers count together
    for reason in skipped.values():
        short = re.split(r": | \(", reason)[0]
        groups.setdefault(re.sub(r"\d+", "N", short), []).append(short)
    parts = "; ".join(f"{len(shorts)} x {_group_label(sorted(shorts))}"
                      for _, shorts in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0])))
    return (f"decompose: no layer was decomposed ({len(skipped)} Conv layer(s) left alone: {parts}); "
            "see the rules, min_in_channels and target options")


def _group_label(shorts: list[str]) -> str:
    first, others = shorts[0], len(set(shorts)) - 1
    return first if not others else f"{first} and {others} other value(s)"


def make_plan(graph, method, opts: DecomposeOptions, data: Optional[CalibrationData] = None, *,
              seed: int = 0) -> tuple[list[_Item], dict[str, str]]:
    """Layers with ranks and child structures, plus the reason for every Conv left alone."""
    shapes = spatial_shapes(graph)
    rules = opts.rules or method.preferred_rules
    convs: dict[str, ConvLayer | str] = {}
    nodes = {}
    for node in graph.nodes:
        if node.op == "Conv":
            layer = conv_layer(node, shapes)
            problem = layer if isinstance(layer, str) else eligibility_problem(layer, rules, opts.min_in_channels)
            convs[node.name], nodes[node.name] = problem or layer, node
    _check_names(opts, convs, {n.name: n.op for n in graph.nodes})
    wanted = set(opts.include) | set(opts.ranks)
    skipped = {name: (v if isinstance(v, str) else "in exclude" if name in opts.exclude else "not in include")
               for name, v in convs.items()
               if isinstance(v, str) or name in opts.exclude or (opts.include and name not in wanted)}
    layers = [v for name, v in convs.items() if name not in skipped]
    ranks = _ranks(method, opts, layers, nodes, skipped, graph, data, seed)
    items = []
    for layer in layers:
        if layer.name in ranks:
            rank = ranks[layer.name]
            items.append(_Item(nodes[layer.name], layer, rank, method.structure(layer, rank)))
    return items, skipped


def _ranks(method, opts, layers: list[ConvLayer], nodes, skipped: dict[str, str], graph, data, seed) -> dict[str, Rank]:
    explicit: dict[str, Rank] = {}
    for layer in layers:
        if layer.name in opts.ranks:
            try:
                explicit[layer.name] = method.normalize_rank(layer, opts.ranks[layer.name])
            except ValueError as exc:
                raise _problem(f"ranks.{layer.name}", str(exc)) from None
    free = [layer for layer in layers if layer.name not in explicit]
    chosen = dict(explicit)
    if opts.target is not None:
        for name, choice in _allocate(method, opts, layers, explicit, nodes, skipped, graph, data, seed).items():
            if choice.rank is None:
                skipped[name] = choice.reason
            else:
                chosen[name] = choice.rank
        return chosen
    for layer in free:
        rank = method.default_rank(layer, weight_of(nodes[layer.name]))
        unprofitable = _no_gain(method, layer, rank) if opts.require_reduction else None
        if unprofitable:
            skipped[layer.name] = unprofitable
        else:
            chosen[layer.name] = rank
    return chosen


def _allocate(method, opts, layers: list[ConvLayer], explicit: dict[str, Rank], nodes, skipped, graph, data, seed):
    """The target shared out by sensitivity: each free layer's output error at a few candidate ranks
    (data-aware: under its input channel covariance on the calibration data), then the greedy
    allocation of ``planning.allocate``."""
    metric = opts.target_metric
    try:
        costs = {layer.name: layer_costs(method, layer, None, metric) for layer in layers}
        fixed_spent = _total([layer_costs(method, layer, explicit[layer.name], metric)
                              for layer in layers if layer.name in explicit], metric)
        ranks = {layer.name: shrinking_ranks(method, layer, metric, opts.sensitivity_ranks)
                 for layer in layers if layer.name not in explicit}
    except ValueError as exc:
        raise _problem("target_metric", str(exc)) from None
    for name in [n for n, r in ranks.items() if not r]:
        skipped[name] = f"no rank reduces its {metric}"
        del ranks[name]
    free = [layer for layer in layers if layer.name in ranks]
    covs = _channel_covariances(graph, free, data, opts, seed) if data is not None else {}
    curves = {layer.name: [Candidate(rank, cost, _output_error(method, layer, weight_of(nodes[layer.name]), rank,
                                                               covs.get(layer.name), opts.data_aware))
                           for rank, cost in ranks[layer.name]] for layer in free}
    fixed_before = _total([costs[name] for name in explicit], metric)
    try:
        return allocate(curves, {name: costs[name] for name in curves}, fixed_before, fixed_spent, opts.target, metric)
    except ValueError as exc:
        raise _problem("target", str(exc)) from None


def _total(vectors, metric: str) -> tuple[float, ...]:
    width = 2 if metric == "flops" else 1
    return tuple(map(sum, zip(*vectors))) if vectors else (0.0,) * width


def _channel_covariances(graph, layers: list[ConvLayer], data: CalibrationData, opts, seed: int):
    """Uncentred covariance [Cin, Cin] of each layer's input channels, from one run of the float model
    (sampled positions; memory: one Cin x Cin matrix per layer)."""
    names = {layer.name: graph.node(layer.name).inputs[0].name for layer in layers}
    accs = {layer.name: CovarianceAccumulator(layer.cin) for layer in layers}
    if not layers:
        return {}
    for batch, values in data.run(graph.to_proto(), list(dict.fromkeys(names.values()))):
        for index, layer in enumerate(layers):
            x = values[names[layer.name]]
            image, row, col = _positions(seed, index, batch, 2, len(x), x.shape[2:], opts.samples_per_image)
            accs[layer.name].add(x[image, :, row, col])
    return {name: acc.covariance() for name, acc in accs.items()}


def _output_error(method, layer: ConvLayer, weight: np.ndarray, rank: Rank, cov: Optional[np.ndarray],
                  aware: bool) -> float:
    """Relative output error E|W*x - Ŵ*x|² / E|W*x|² of the layer decomposed at ``rank``, with inputs of
    channel covariance ``cov`` (kernel taps taken as uncorrelated; identity without data: the
    relative weight error squared). Data-aware runs decompose with the same input whitening."""
    children = method.structure(layer, rank)
    first = children[0]
    taps = first.kernel[0] * first.kernel[1]
    first_cov = np.kron(cov, np.eye(taps)) if aware and cov is not None else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        approx = compose_kernels(children, method.decompose(layer, weight, rank, input_cov=first_cov))
    w = np.asarray(weight, np.float64).reshape(layer.cout, layer.cin, -1)
    d = w - approx.reshape(w.shape)
    c = np.eye(layer.cin) if cov is None else cov
    signal = float(np.einsum("oit,ij,ojt->", w, c, w))
    return float(np.einsum("oit,ij,ojt->", d, c, d)) / signal if signal > 0 else 0.0


def _no_gain(method, layer: ConvLayer, rank: Rank) -> Optional[str]:
    before, after = cost_of(method, layer, None), cost_of(method, layer, rank)
    metric = "flops" if before.flops is not None else "params"
    if after.metric(metric) >= before.metric(metric):
        return f"rank {list(rank)} from the {method.name} rule would not reduce {metric} " \
               f"({before.metric(metric):,} -> {after.metric(metric):,})"
    return None


# -- decomposition, data-free and data-aware ---------------------------------------------------
def decompose_graph(graph, items: list[_Item], method, opts: DecomposeOptions, data: Optional[CalibrationData],
                    *, seed: int = 0) -> DecompositionReport:
    report = DecompositionReport(method.name, opts.data_aware, opts.target, opts.target_metric,
                                 dataset=data.name if data else None, samples=data.samples if data else 0)
    aware = opts.data_aware and data is not None
    targets, reference = _reference(graph, items if aware else [], data, opts, seed) if data else ({}, None)
    for index, item in enumerate(items):
        weight, bias = weight_of(item.node), bias_of(item.node)
        cov = _input_covariance(graph, item, index, data, opts, seed) if aware else None
        with warnings.catch_warnings():       # tensorly warns when a CP rank exceeds a mode size
            warnings.simplefilter("ignore", UserWarning)
            child_weights = method.decompose(item.layer, weight, item.rank, input_cov=cov)
        nodes = replace_conv(graph, item.node, item.children, child_weights, bias)
        item.names = [n.name for n in nodes]
        response = _refit_last(graph, item, nodes, index, targets[index], data, opts, seed) if aware else None
        report.layers.append(_layer_report(method, item, nodes, weight, response))
    if items:
        graph.finalize()
    if reference is not None:
        outputs = [t.name for t in graph.gs.outputs]
        approx = [out for _, batch in data.run(graph.to_proto(), outputs) for out in batch.values()]
        report.output_sqnr_db = sqnr_db(reference, approx)
    return report


def _positions(seed: int, layer: int, batch: int, purpose: int, count: int, out_hw, per_image: int):
    """Sample positions, reproducible per (layer, batch, purpose) so separate runs line up."""
    rng = np.random.default_rng([seed, layer, batch, purpose])
    return sample_positions(rng, count, tuple(out_hw), per_image)


def _reference(graph, items: list[_Item], data: CalibrationData, opts, seed: int):
    """One run of the float model: sampled layer outputs (refit targets) and the model outputs."""
    layer_outputs = [item.node.outputs[0].name for item in items]
    model_outputs = [t.name for t in graph.gs.outputs]
    targets: dict[int, list[np.ndarray]] = {i: [] for i in range(len(items))}
    reference = []
    for batch, values in data.run(graph.to_proto(), list(dict.fromkeys(layer_outputs + model_outputs))):
        for index, name in enumerate(layer_outputs):
            y = values[name]
            image, row, col = _positions(seed, index, batch, 0, len(y), y.shape[2:], opts.samples_per_image)
            targets[index].append(y[image, :, row, col])
        reference.extend(values[name] for name in model_outputs)
    return targets, reference


def _input_covariance(graph, item: _Item, index: int, data: CalibrationData, opts, seed: int) -> np.ndarray:
    """Covariance of the first child's input patches, as the partly decomposed model feeds them."""
    first = item.children[0]
    name = item.node.inputs[0].name
    acc = CovarianceAccumulator(first.cin * first.kernel[0] * first.kernel[1])
    for batch, values in data.run(graph.to_proto(), [name]):
        x = values[name]
        positions = _positions(seed, index, batch, 1, len(x), first.out_hw(x.shape[2:]), opts.samples_per_image)
        acc.add(gather_patches(x, first, positions))
    return acc.covariance()


def _refit_last(graph, item: _Item, nodes: list[gs.Node], index: int, targets: list[np.ndarray],
                data: CalibrationData, opts, seed: int) -> tuple[Optional[float], Optional[float]]:
    """Least-squares refit of the last child on its real inputs; (response SQNR before, after)."""
    last, spec = nodes[-1], item.children[-1]
    weight = last.inputs[1].values
    bias = last.inputs[2].values if spec.has_bias else None
    w0 = weight.reshape(weight.shape[0], -1).T.astype(np.float64)
    acc = LeastSquaresRefit(w0.shape[0], w0.shape[1], intercept=spec.has_bias)
    name = last.inputs[0].name
    for batch, values in data.run(graph.to_proto(), [name]):
        z = values[name]
        positions = _positions(seed, index, batch, 0, len(z), spec.out_hw(z.shape[2:]), opts.samples_per_image)
        acc.add(gather_patches(z, spec, positions), targets[batch])
    before = acc.sqnr_db(w0, bias)
    w, b = acc.solve(w0, bias)
    last.inputs[1].values = np.ascontiguousarray(w.T.reshape(weight.shape), dtype=weight.dtype)
    if spec.has_bias:
        last.inputs[2].values = np.ascontiguousarray(b, dtype=bias.dtype)
    return before, acc.sqnr_db(w, b)


def _layer_report(method, item: _Item, nodes: list[gs.Node], weight: np.ndarray, response) -> LayerReport:
    before, after = cost_of(method, item.layer, None), cost_of(method, item.layer, item.rank)
    composed = compose_kernels(item.children, [n.inputs[1].values for n in nodes])
    return LayerReport(item.layer.name, method.mode(item.layer), item.rank, [n.name for n in nodes],
                       before.flops, after.flops, before.params, after.params,
                       relative_error(weight, composed), response[1] if response else None,
                       response[0] if response else None)


# -- the optional trade-off plot ---------------------------------------------------------------
def _plot(ctx, opts: DecomposeOptions, method, original: onnx.ModelProto, data, chosen: DecompositionReport) -> None:
    """Re-run the decomposition from the original model at each plot target; plot SQNR vs FLOPs kept."""
    from ..ir.graph import Graph
    from ..reports.plot import plot_tradeoff
    points = []
    for target in sorted(set(opts.plot_targets)):
        graph = Graph.from_proto(_copy(original), name=ctx.model_name)
        sweep = opts.model_copy(update={"target": target})
        try:
            items, _ = make_plan(graph, method, sweep, data, seed=ctx.seed)
        except ConfigError:
            continue                       # e.g. explicit ranks above this target: no point there
        report = decompose_graph(graph, items, method, sweep, data, seed=ctx.seed)
        if report.flops_reduction and report.output_sqnr_db is not None:
            points.append((1 / report.flops_reduction, report.output_sqnr_db))
    label = f"{method.name} ({'data-aware' if opts.data_aware else 'data-free'})"
    series = {label: points}
    if chosen.flops_reduction and chosen.output_sqnr_db is not None:
        series["chosen"] = [(1 / chosen.flops_reduction, chosen.output_sqnr_db)]
    plot_tradeoff(series, ctx.output_path(opts.plot.format(model=ctx.model_name)),
                  title=f"{ctx.model_name}: output SQNR on '{chosen.dataset}' vs FLOPs kept")


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return copy
