"""refine_ranges: output-aware refinement of the activation ranges any calibrator chose.

Calibrators minimise each tensor's own quantization error; the network cares about its outputs.
This pass adjusts the ranges to minimise the error of the quantized model's outputs against the
float model's, on a bounded subset of the calibration data (``num_batches``, ``max_samples``):
coordinate descent over the quantized tensors, noisiest first (lowest own SQNR in the quantized
model), trying ``factors`` of clip_max (and separately of clip_min for asymmetric ranges that reach
below zero; symmetric ranges shrink both ends), keeping a change only when the output error drops.

Evaluation is fast because the pass builds ONE onnxruntime model emulating the quantized model:
weights replaced by their fake-quantized values (``int8 * scale_w`` from ``weight_quant``) and each
quantized tensor passed through ``QuantizeLinear -> DequantizeLinear`` (uint8 codes, zero point
``offset_d + 128``: the same codes as AMCT's ``clip(rint(x / scale) + offset)``; 16-bit tensors take
the float chain of ``quant.fakequant``) whose scale and zero point are graph INPUTS: trying a candidate
is one more run of the same session. Two float ops per tensor instead of six halve the evaluation time
on MobileNetV2; the session runs with onnxruntime's QDQ fusions off (they assume constant factors).
Biases stay float (their int32 rounding error is negligible next to the activations').
The final model is not written here.

Units: layers that read the same tensor with the same ``ActQuantParams`` object share one
fake-quant branch and are refined together; the refined object replaces theirs in ``act_quant``.

Layouts: the fake-quant and Ascend models quantize only the layer inputs, the QDQ model also the
block outputs of ``tensor_quant`` (``calibrate{block_outputs: true}``) and the readers it makes
integer (a residual Add reads the quantized copy when its other input is quantized too). ``layout``
picks the model whose output error is minimised; ``auto`` takes the QDQ layout exactly when
``tensor_quant`` exists, whose refined ranges are then written back there.
"""
from __future__ import annotations

import math
import sys
from typing import Any, Literal, Optional, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper
from pydantic import Field, PositiveInt, field_validator

from ..errors import CalibrationError
from ..options import Options
from ..quant.emulate import PREFIX, Unit as _Unit, build_eval_model, factor_feed
from ..quant.emulate import layer_units as _units, qdq_units as _qdq_units
from ..quant.params import ActQuantParams
from ..runtime.ort import make_session
from .base import Pass, PassResult, float_reference

__all__ = ["RefineRangesPass", "RefineRangesOptions", "build_eval_model", "eval_session", "factor_feed"]



class RefineRangesOptions(Options):
    dataset: str = Field("calib", description="Dataset whose first batches are the refinement data.")
    num_batches: Optional[PositiveInt] = Field(
        None, description="At most this many batches of the dataset measure the output error; default: as many "
                          "as max_samples needs (a model with a fixed batch of 1 then still sees max_samples).")
    max_samples: Optional[PositiveInt] = Field(
        32, description="At most this many samples in all (a batch with a free batch dimension is cut); "
                        "evaluation time grows linearly with it.")
    factors: list[float] = Field(
        default_factory=lambda: [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], max_length=100,
        description="Multipliers tried in this order for clip_max (and clip_min); 1.0 = the current range. "
                    "Deep shrinks pay off on the few tensors whose outliers dominate (MobileNetV2: 0.3 and below).")
    sweeps: int = Field(1, ge=1, le=5, description="Passes over all tensors (a sweep without change stops).")
    refine_min: bool = Field(True, description="Also shrink clip_min of asymmetric ranges that reach below zero.")
    min_improvement: float = Field(
        0.02, ge=0.0, lt=1.0,
        description="Keep a change only if it lowers the output error by this fraction: re-rounding one tensor "
                    "moves the error by a few percent either way, and chasing that fits the subset, not the data.")
    layout: Literal["auto", "fakequant", "qdq"] = Field(
        "auto", description="Model whose output error is minimised: 'fakequant' (layer inputs quantized: "
                            "fake-quant and Ascend models) or 'qdq' (also the other readers of those tensors and "
                            "the block outputs in 'tensor_quant'); auto: qdq when 'tensor_quant' exists.")
    candidates: bool = Field(
        True, description="Use artifact 'range_candidates' (calibrate's 'candidates': the ranges of other "
                          "calibrators): first the whole model takes each calibrator's ranges in turn and keeps the "
                          "one with the lowest output error, then each tensor tries the others.")
    max_evaluations: Optional[PositiveInt] = Field(
        None, description="Stop the per-tensor search after this many evaluations of the model (noisiest tensors "
                          "first): bounds the time on large models.")
    patience: int = Field(
        2, ge=1, description="Stop trying further factors of one range after this many candidates in a row "
                             "each worse than the one before (the error curve has turned up).")

    @field_validator("factors")
    @classmethod
    def _positive(cls, values: list[float]) -> list[float]:
        if any(not (v > 0 and math.isfinite(v)) for v in values):
            raise ValueError("factors must be positive numbers ([] or [1.0]: no factor search)")
        return values


class RefineRangesPass(Pass):
    name = "refine_ranges"
    summary = ("Output-aware range refinement: shrink activation ranges where that lowers the quantized "
               "model's output error (updates 'act_quant').")
    Options = RefineRangesOptions
    requires = frozenset({"act_quant", "weight_quant", "layer_map"})
    produces = frozenset({"act_quant", "tensor_quant"})
    references = {"dataset": "datasets"}

    def run(self, graph, ctx) -> PassResult:
        act_quant = ctx.artifacts["act_quant"]
        layer_map = ctx.artifacts["layer_map"]
        blocks = ctx.artifacts.get("tensor_quant")
        qdq = self.options.layout == "qdq" or (self.options.layout == "auto" and blocks is not None)
        units = _qdq_units(graph, layer_map, act_quant, blocks or {}) if qdq else _units(layer_map, act_quant)
        candidates = ctx.artifacts.get("range_candidates") if self.options.candidates else None
        for unit in units:
            unit.candidates = tuple((candidates or {}).get(unit.tensor, ()))
        if not units:
            return PassResult(False, {"tensors": 0, "tensors_changed": 0, "sweeps": 0})
        feeds = _subset(graph, ctx.dataset(self.options.dataset), self.options)
        float_model = float_reference(graph, ctx).to_proto()
        model = build_eval_model(graph, layer_map, ctx.artifacts["weight_quant"], units)
        evaluator = _Evaluator(float_model, model, feeds, units)
        stats = _coordinate_descent(evaluator, units, self.options, ctx.progress)
        for unit in units:
            for name in unit.layers:
                act_quant[name] = unit.params      # layers of one unit keep sharing one object
            if not unit.layers:
                blocks[unit.tensor] = unit.params
        ctx.artifacts["act_quant"] = act_quant
        stats["layout"] = "qdq" if qdq else "fakequant"
        return PassResult(False, stats)


# -- units and data ----------------------------------------------------------------------------
def _subset(graph, source, options: RefineRangesOptions) -> list[dict[str, np.ndarray]]:
    """The first batches, cut to ``max_samples`` where the batch dimension is free."""
    from ..runtime.collector import planned_batches
    plan = planned_batches(graph, source, None)
    fixed = any(i.fixed_batch for i in plan.inputs)
    budget = options.max_samples if options.max_samples is not None else math.inf
    feeds = []
    limit = options.num_batches if options.num_batches is not None else math.inf
    if limit == math.inf and budget == math.inf:
        limit = 2      # neither bound given: two batches, as a calibration pass would start with
    for index, feed in enumerate(source.batches(plan.inputs)):
        if index >= limit or budget <= 0:
            break
        size = len(next(iter(feed.values())))
        if size > budget and not fixed:
            feed = {k: v[: int(budget)] for k, v in feed.items()}
            size = int(budget)
        feeds.append(feed)
        budget -= size
    if not feeds:
        raise CalibrationError(f"dataset '{source.name}' yields no batch")
    return feeds


def eval_session(model: onnx.ModelProto):
    """An onnxruntime session for the evaluation model: QDQ fusions off (its factors are inputs)."""
    return make_session(model, config={"session.disable_quant_qdq": "1"})


def _with_probes(model: onnx.ModelProto, units: Sequence[_Unit]) -> onnx.ModelProto:
    """A copy of the evaluation model with outputs ``<prefix>.<i>.noise`` / ``.power``: the summed
    squared quantization error and signal of each unit (used once, to order the units; onnxruntime
    runs every node whatever is fetched, so the search itself runs the model without them)."""
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    for unit in units:
        base = f"{PREFIX}.{unit.index}"
        probed.graph.node.extend([
            helper.make_node("Sub", [unit.output, unit.tensor], [f"{base}.err"], name=f"{base}.err"),
            helper.make_node("ReduceSumSquare", [f"{base}.err"], [f"{base}.noise"], keepdims=0, name=f"{base}.noise"),
            helper.make_node("ReduceSumSquare", [unit.tensor], [f"{base}.power"], keepdims=0, name=f"{base}.power")])
        probed.graph.output.extend([helper.make_tensor_value_info(f"{base}.{k}", TensorProto.FLOAT, [])
                                    for k in ("noise", "power")])
    return probed


# -- evaluation --------------------------------------------------------------------------------
class _Evaluator:
    """Output error of the fake-quant model for a set of unit params, on the stored feeds."""

    def __init__(self, float_model: onnx.ModelProto, model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]],
                 units: list[_Unit]) -> None:
        self.feeds, self.units = feeds, units
        self.outputs = [o.name for o in float_model.graph.output]
        self.refs = list(self._runs(make_session(float_model), self.outputs, {}))
        self.model, self.session = model, eval_session(model)
        self.power = [sum(float(np.square(r[k], dtype=np.float64).sum()) for r in self.refs)
                      for k in range(len(self.outputs))]
        self.count = [sum(r[k].size for r in self.refs) for k in range(len(self.outputs))]
        self.evaluations = 0

    @property
    def samples(self) -> int:
        return sum(len(next(iter(feed.values()))) for feed in self.feeds)

    def run(self, params: Sequence[ActQuantParams], probe: bool = False) -> tuple[float, float]:
        """(objective = mean over outputs of SSE / signal energy, plain MSE over all output values)."""
        factors = {}
        for unit, p in zip(self.units, params):
            factors.update(factor_feed(unit, p))
        fetch = self.outputs + ([f"{PREFIX}.{u.index}.{k}" for u in self.units for k in ("noise", "power")]
                                if probe else [])
        sse = [0.0] * len(self.outputs)
        probes = np.zeros(2 * len(self.units))
        session = eval_session(_with_probes(self.model, self.units)) if probe else self.session
        for got, ref in zip(self._runs(session, fetch, factors), self.refs):
            for k in range(len(self.outputs)):
                sse[k] += float(np.square(got[k] - ref[k], dtype=np.float64).sum())
            if probe:
                probes += np.asarray(got[len(self.outputs):], dtype=np.float64)
        self.evaluations += 1
        if probe:
            for i, unit in enumerate(self.units):
                unit.noise = probes[2 * i] / max(probes[2 * i + 1], 1e-30)
        objective = float(np.mean([e / max(p, 1e-30) for e, p in zip(sse, self.power)]))
        return objective, sum(sse) / max(sum(self.count), 1)

    def _runs(self, session, fetch: list[str], factors: dict[str, np.ndarray]):
        for feed in self.feeds:
            yield session.run(fetch, {**feed, **factors})


# -- the search --------------------------------------------------------------------------------
def _candidates(params: ActQuantParams, factors: Sequence[float], refine_min: bool) -> list[list[ActQuantParams]]:
    """Per side, the candidate params (current range scaled by each factor != 1)."""
    from ..quant.math import scale_offset_from_range
    others = [f for f in factors if f != 1.0]
    if not others:
        return []
    if params.offset == 0:      # symmetric: [-A, A] shrinks as a whole
        return [[ActQuantParams(params.scale * f, 0, params.num_bits) for f in others]]
    lo, hi = params.clip_min, params.clip_max
    sides = [[scale_offset_from_range(lo, hi * f, params.num_bits) for f in others]]
    if refine_min and lo < 0 and -lo > 1e-3 * max(hi, 0.0):
        sides.append([scale_offset_from_range(lo * f, hi, params.num_bits) for f in others])
    return sides


def _coordinate_descent(evaluator: _Evaluator, units: list[_Unit], options: RefineRangesOptions,
                        progress: bool) -> dict[str, Any]:
    current = [u.params for u in units]
    before, mse_before = evaluator.run(current, probe=True)
    state = {"error": before, "mse": mse_before}
    chosen = _whole_model_pick(evaluator, units, current, state, options)
    order = sorted(range(len(units)), key=lambda i: -units[i].noise)     # noisiest first
    sweeps = 0
    budget = options.max_evaluations if options.max_evaluations is not None else math.inf
    with _bar(progress, len(units) * options.sweeps) as bar:
        for _ in range(options.sweeps):
            sweeps += 1
            changed = 0
            for i in order:
                if evaluator.evaluations >= budget:
                    break
                others = [p for p in units[i].candidates if p != current[i]] if sweeps == 1 else []
                if others and _refine_side(evaluator, current, i, others, state, options, ordered=False):
                    units[i].changed, changed = True, changed + 1
                for side in _candidates(current[i], options.factors, options.refine_min):
                    if _refine_side(evaluator, current, i, side, state, options):
                        units[i].changed, changed = True, changed + 1
                bar.update(1)
            if not changed:
                break
    for unit, params in zip(units, current):
        unit.changed = unit.changed or params is not unit.params
        unit.params = params
    return {"whole_model_pick": chosen, "tensors": len(units), "tensors_changed": sum(u.changed for u in units),
            "changed": [u.tensor for u in units if u.changed], "sweeps": sweeps,
            "evaluations": evaluator.evaluations, "samples": evaluator.samples,
            "mse_before": mse_before, "mse_after": state["mse"],
            "sqnr_db_before": _db(before), "sqnr_db_after": _db(state["error"])}


def _whole_model_pick(evaluator: _Evaluator, units: list[_Unit], current: list[ActQuantParams],
                      state: dict[str, float], options: RefineRangesOptions) -> int:
    """Every unit takes its k-th candidate at once (k = 1 .. the most any unit has); the lowest output
    error (by ``min_improvement``) becomes the start of the per-tensor search. Returns the k taken
    (0: the calibrator's own ranges)."""
    count = max((len(u.candidates) for u in units), default=0)
    best = 0
    for k in range(1, count):
        trial = [u.candidates[k] if k < len(u.candidates) else p for u, p in zip(units, current)]
        error, mse = evaluator.run(trial)
        if error < state["error"] * (1.0 - options.min_improvement):
            state["error"], state["mse"], best = error, mse, k
            current[:] = trial
    return best


def _refine_side(evaluator: _Evaluator, current: list[ActQuantParams], i: int, side: list[ActQuantParams],
                 state: dict[str, float], options: RefineRangesOptions, ordered: bool = True) -> bool:
    """Try one side's candidates for unit ``i`` in order (``ordered``: stop once the error keeps rising);
    keep the best if it beats the error enough."""
    trial = list(current)
    found, previous, rising = None, state["error"], 0
    for candidate in side:
        trial[i] = candidate
        error, mse = evaluator.run(trial)
        if error < state["error"] * (1.0 - options.min_improvement) and (found is None or error < found[0]):
            found = (error, mse, candidate)
        rising = rising + 1 if error > previous else 0
        previous = error
        if ordered and rising >= options.patience:
            break
    if found is None:
        return False
    state["error"], state["mse"], current[i] = found
    return True


def _db(relative_error: float) -> float:
    return float("inf") if relative_error <= 0 else round(-10.0 * math.log10(relative_error), 3)


def _bar(enabled: bool, total: int):
    from tqdm import tqdm
    return tqdm(total=total, desc="refine_ranges", unit="tensor", disable=not enabled, file=sys.stderr, leave=False)
