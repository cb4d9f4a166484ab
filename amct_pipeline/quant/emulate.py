"""The quantized model emulated in float for onnxruntime: fake-quantized weights and one
``QuantizeLinear -> DequantizeLinear`` pair (8 bits; AMCT's float chain otherwise) per activation
quantizer, whose factors are graph INPUTS, so trying other factors is one more run of the same session.

Shared by the passes that measure the quantized model's outputs on data (``refine_ranges`` searches
ranges with it, ``quantize_weights{bias_correction_input: sequential}`` corrects biases with it).
Units are the quantizers of a layout: :func:`layer_units` the fake-quant / Ascend layout (layer inputs),
:func:`qdq_units` the QDQ layout ``lower{targets=[qdq]}`` writes (``quant.facts.qdq_quantizers``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import CalibrationError
from ..ir.edit import Namer, add_node, copy_graph, ensure_opset, reroute
from .fakequant import QuantFactors, emit_antiquant, emit_fake_quant
from .params import ActQuantParams
from .weights import dequantize_weight, weight_values

__all__ = ["Unit", "layer_units", "qdq_units", "eval_graph", "build_eval_model", "factor_feed", "MIN_OPSET"]

PREFIX = "amct_refine"
MIN_OPSET = 13       # Round and Clip-with-inputs need 11; 13 is what the converter targets reliably


@dataclass
class Unit:
    """One fake-quant branch: the layers reading ``tensor`` with the same params object."""

    tensor: str
    layers: list[str]
    params: ActQuantParams
    index: int = 0
    changed: bool = False
    noise: float = 0.0
    all_readers: bool = False     # every reader of the tensor reads the branch, not only ``layers``
    output: str = ""              # the fake-quantized tensor, named when the evaluation model is built
    candidates: tuple = ()        # other ranges to try (calibrate's range_candidates)
    extra: tuple = ()             # more tensors quantized with these factors (QDQ data movement, Concat inputs)
    float_readers: tuple = ()     # readers of its tensors that take the float value (quant.facts.float_readers)
    chain: bool = False           # the float chain even at 8 bits (for the numpy engine, which has no QDQ ops)

    @property
    def qdq(self) -> bool:
        """8-bit: a QuantizeLinear / DequantizeLinear pair; else the float chain of quant.fakequant."""
        return self.params.num_bits == 8 and not self.chain

    @property
    def names(self) -> tuple[str, ...]:
        """Graph inputs: scale and uint8 zero point (``qdq``), or 1/scale, offset, the code range
        (low, high) and scale."""
        base = f"{PREFIX}.{self.index}"
        if self.qdq:
            return f"{base}.scale", f"{base}.zero_point"
        return f"{base}.inv_scale", f"{base}.offset", f"{base}.low", f"{base}.high", f"{base}.scale"


def layer_units(layer_map, act_quant) -> list[Unit]:
    """The fake-quant layout's quantizers: one unit per (layer input, params object)."""
    units: dict[tuple[str, int], Unit] = {}
    for layer in layer_map.layers():
        params = act_quant.get(layer.name)
        if params is None:
            continue
        key = (layer.input, id(params))
        if key not in units:
            units[key] = Unit(layer.input, [], params, index=len(units))
        units[key].layers.append(layer.name)
    return list(units.values())


def qdq_units(graph, layer_map, act_quant, blocks: dict[str, ActQuantParams]) -> list[Unit]:
    """The quantizers of the QDQ model ``lower{targets=[qdq]}`` writes (``quant.facts.qdq_quantizers``):
    data movement and Concat inputs share their class's factors, so one unit may quantize several tensors."""
    from .facts import qdq_quantizers
    layers = {layer.name: layer for layer in layer_map.layers() if act_quant.get(layer.name) is not None}
    return [Unit(q.key, list(q.layers), q.params, index=i, all_readers=not q.own, extra=q.tensors[1:],
                 float_readers=q.float_readers) for i, q in enumerate(qdq_quantizers(graph, layers, act_quant, blocks))]


# -- the fake-quant evaluation model ------------------------------------------------------------
def build_eval_model(graph, layer_map, weight_quant, units: Sequence[Unit], *,
                     where: str = "pass 'refine_ranges'") -> onnx.ModelProto:
    """The float graph with fake-quantized weights and input-driven activation fake-quant branches.

    Each unit's branch ends in ``unit.output``; its factors are graph inputs (``unit.names``), so the
    search changes them without rebuilding the model. ``graph`` is never changed.
    """
    model = eval_graph(graph, layer_map, weight_quant, units, where=where)
    model.finalize()
    return model.to_proto()


def eval_graph(graph, layer_map, weight_quant, units: Sequence[Unit], *, where: str = "pass 'refine_ranges'"):
    """:func:`build_eval_model` as an editable graph (not finalized), for callers adding probes or inputs."""
    model = copy_graph(graph)
    ensure_opset(model, MIN_OPSET, where=where, path="the model",
                 hint="Round and Clip with inputs need opset 11; upgrade the model")
    namer = Namer(model)
    _fake_quant_weights(graph, model, layer_map, weight_quant)
    for unit in units:
        _insert_fake_quant(model, namer, unit)
    return model


def _fake_quant_weights(graph, model, layer_map, weight_quant) -> None:
    """Point each quantized layer's weight input at a new initializer holding ``q * scale_w`` (the
    codes of the weight as the layer applies it, Gemm's alpha included)."""
    for layer in layer_map.layers():
        params = weight_quant.get(layer.name) if layer.weight is not None else None
        if params is None:
            continue
        seen = weight_values(graph, layer)
        try:
            values = dequantize_weight(params.quantized, params.scale, layer)
        except ValueError as exc:
            raise CalibrationError(str(exc)) from None
        if values.shape != seen.shape:
            raise CalibrationError(f"layer '{layer.name}': weight_quant holds a {values.shape} weight, the layer "
                                   f"reads {seen.shape}")
        node = model.node(layer.name)
        index = next(i for i, t in enumerate(node.inputs) if t.name == layer.weight)
        node.inputs[index] = gs.Constant(f"{PREFIX}.{layer.name}.weight", values.astype(seen.dtype, copy=False))
        if layer.op_type == "Gemm" and "alpha" in node.attrs:   # the codes quantize alpha * B (effective_weight)
            node.attrs["alpha"] = 1.0


def _insert_fake_quant(model, namer: Namer, unit: Unit) -> None:
    """The unit's fake quant, factors read from graph inputs, in front of the unit's layers (or of
    every reader but its float readers), and in front of the readers of its extra tensors."""
    if unit.qdq:
        inputs = [gs.Variable(unit.names[0], dtype=np.float32, shape=[]),
                  gs.Variable(unit.names[1], dtype=np.uint8, shape=[])]
    else:
        inputs = [gs.Variable(name, dtype=np.float32, shape=[]) for name in unit.names]
    model.gs.inputs.extend(inputs)
    x = model.tensors()[unit.tensor]
    readers = [node for node in x.outputs if node.name not in unit.float_readers]
    base = f"{PREFIX}.{unit.index}"
    out = _branch(model, namer, x, base, inputs)
    unit.output = out.name
    if unit.all_readers:
        reroute(x, out, readers)
    else:
        for name in unit.layers:
            model.node(name).inputs[0] = out
    for index, name in enumerate(unit.extra):
        extra = model.tensors()[name]
        readers = [node for node in extra.outputs if node.name not in unit.float_readers]
        reroute(extra, _branch(model, namer, extra, f"{base}.{index}", inputs), readers)


def _branch(model, namer: Namer, x: gs.Tensor, base: str, inputs: list[gs.Variable]) -> gs.Tensor:
    """QuantizeLinear -> DequantizeLinear (scale, uint8 zero point), or AMCT's float chain (SPEC 5.4)."""
    if len(inputs) == 2:
        codes = add_node(model, namer, "QuantizeLinear", f"{base}.quant", [x, *inputs]).outputs[0]
        out = add_node(model, namer, "DequantizeLinear", f"{base}.dequant", [codes, *inputs]).outputs[0]
        codes.dtype, out.dtype = np.uint8, np.float32
        return out
    inv, offset, low, high, scale = inputs
    codes = emit_fake_quant(model, namer, x, base, QuantFactors(inv, offset, low, high))
    return emit_antiquant(model, namer, codes, f"{base}.dequant", scale)


def factor_feed(unit: Unit, params: ActQuantParams) -> dict[str, np.ndarray]:
    """The graph inputs of the unit's branch for ``params`` (0-d arrays: onnxruntime takes arrays only)."""
    if unit.qdq:
        scale, zero = unit.names
        return {scale: np.array(params.scale, np.float32), zero: np.array(params.offset + 128, np.uint8)}
    values = (1.0 / np.float32(params.scale), params.offset, params.qmin, params.qmax, params.scale)
    return {name: np.array(value, dtype=np.float32) for name, value in zip(unit.names, values)}

