"""fuse_bn: fold inference BatchNormalization into the Conv/ConvTranspose/Gemm/MatMul before it.

AMCT's ONNX fusions (SPEC 6.2): Conv+BatchNormalization (BN removed), BatchNormalization+Mul and
BatchNormalization+Add; ``do_fusion`` / ``skip_fusion_layers`` are AMCT's config keys (SPEC 2.1), given
inline or read from an AMCT quant config (``amct_config``: .json or .cfg, relative to the working directory).

Math, per output channel c (computed in float64, cast back to the weight's dtype)::

    s = γ / √(var + ε)        W'[c] = W[c] · s        b' = (b − μ) · s + β

Every refusal is recorded with a reason (``stats["refused"][bn_name]``). Weights are replaced by new
constants (copy on write): an initializer array is never edited in place, and constants of layers
that are not folded are never loaded (external data stays on disk).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import onnx_graphsurgeon as gs
from pydantic import Field

from ..amct.model_config import read_amct_config
from ..errors import ConfigError, Problem
from ..ir.constants import constant_dtype, constant_shape, constant_values, is_constant
from ..options import Options, suggest
from .base import Pass, PassResult

__all__ = ["FuseBatchNormPass", "FuseBatchNormOptions", "FUSABLE_LAYERS", "bn_fold_factors"]

FUSABLE_LAYERS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
SKIPPABLE_TYPES = FUSABLE_LAYERS + ("BatchNormalization",)
CHUNK_ELEMENTS = 1 << 22          # float64 scratch per step: bounds peak memory on huge weights
FLOAT_KINDS = "f"


class FuseBatchNormOptions(Options):
    do_fusion: bool = Field(True, description="AMCT 'do_fusion': fold BatchNormalization (and BN+Mul/BN+Add) "
                                              "into the preceding layer; false turns the pass into a no-op.")
    skip_fusion_layers: list[str] = Field(
        default_factory=list,
        description="AMCT 'skip_fusion_layers': names of Conv/ConvTranspose/Gemm/MatMul layers (or of the "
                    "BatchNormalization nodes) to leave unfused; every name must exist in the model.")
    amct_config: Optional[str] = Field(
        None, description="AMCT quant config (.json or simplified .cfg; a relative path resolves against the "
                          "current working directory) supplying do_fusion and skip_fusion_layers; either option "
                          "set explicitly in the pipeline wins over the file.")


@dataclass
class _Fold:
    """One planned fold: ``layer`` [-> ``add`` (constant bias)] -> ``bn``."""

    bn: gs.Node
    layer: gs.Node
    add: gs.Node | None
    add_const_index: int       # which input of ``add`` is the constant
    weight_axis: int           # output-channel axis of the weight
    groups: int                # ConvTranspose groups (weight axis 1 is per group)
    out_rank: int              # rank of the layer's output


class FuseBatchNormPass(Pass):
    name = "fuse_bn"
    summary = ("Fold inference BatchNormalization into the preceding Conv/ConvTranspose/Gemm/MatMul, "
               "and constant Mul/Add after a BN into the BN (AMCT do_fusion).")
    Options = FuseBatchNormOptions
    reads = ("amct_config",)

    def run(self, graph, ctx) -> PassResult:
        do_fusion, skip_names = self._settings(graph)
        skip = _check_skip_names(graph, skip_names)
        if not do_fusion:
            return PassResult(False, {"fused": 0, "refused": {}, "disabled": True})
        stats: dict[str, Any] = {"fused": 0, "bn_mul_fused": 0, "bn_add_fused": 0, "refused": {}}
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            if _bn_problem(graph, bn) is None and not _skipped(bn, _producer(bn), skip):
                _fold_mul_add_into_bn(graph, bn, stats)
        for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
            plan = _plan(graph, bn, skip)
            if isinstance(plan, str):
                stats["refused"][bn.name] = plan
                continue
            _apply(graph, plan)
            stats["fused"] += 1
        modified = stats["fused"] + stats["bn_mul_fused"] + stats["bn_add_fused"] > 0
        if modified:
            graph.finalize()
        if stats["refused"]:
            ctx.logger.info("fuse_bn: %d BatchNormalization left: %s", len(stats["refused"]), stats["refused"])
        return PassResult(modified, stats)

    def _settings(self, graph) -> tuple[bool, list[str]]:
        """(do_fusion, skip_fusion_layers): the options, else the AMCT config's values."""
        opts = self.options
        if opts.amct_config is None:
            return opts.do_fusion, list(opts.skip_fusion_layers)
        config = read_amct_config(graph, opts.amct_config, "pass 'fuse_bn'")
        explicit = opts.model_fields_set
        return (opts.do_fusion if "do_fusion" in explicit else config.do_fusion,
                list(opts.skip_fusion_layers if "skip_fusion_layers" in explicit else config.skip_fusion_layers))


# -- options checked against the model ---------------------------------------------------------
def _check_skip_names(graph, names: list[str]) -> set[str]:
    """Every skip_fusion_layers name must be a node of a fusable type (AMCT rule): typo safety."""
    ops = {n.name: n.op for n in graph.nodes}
    for name in names:
        if name not in ops:
            candidates = [n for n, op in ops.items() if op in SKIPPABLE_TYPES]
            hint = suggest(name, candidates) or f"fusable layers: {_preview(candidates)}"
            raise ConfigError([Problem("pass 'fuse_bn'", "skip_fusion_layers",
                                       f"no layer named '{name}' in the model", hint)])
        if ops[name] not in SKIPPABLE_TYPES:
            raise ConfigError([Problem("pass 'fuse_bn'", "skip_fusion_layers",
                                       f"'{name}' is a {ops[name]}, not a fusable layer",
                                       f"give a {', '.join(SKIPPABLE_TYPES)} node")])
    return set(names)


def _preview(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "none"


def _producer(node: gs.Node) -> gs.Node | None:
    x = node.inputs[0] if node.inputs else None
    return x.inputs[0] if x is not None and x.inputs else None


def _skipped(bn: gs.Node, layer: gs.Node | None, skip: set[str]) -> bool:
    return bn.name in skip or (layer is not None and layer.name in skip)


def _present(node: gs.Node, index: int) -> gs.Tensor | None:
    """An optional input, or None when absent or given as the empty name."""
    if index < len(node.inputs) and node.inputs[index].name:
        return node.inputs[index]
    return None


def _users(graph, tensor: gs.Tensor) -> int:
    """Nodes reading the tensor, plus one if it is a graph output."""
    return len(tensor.outputs) + int(graph.is_graph_output(tensor))


def _replace_input(graph, node: gs.Node, index: int, values: np.ndarray) -> None:
    """Point ``node.inputs[index]`` at a new constant; reuse the old name when nothing else reads it."""
    old = node.inputs[index]
    exclusive = isinstance(old, gs.Constant) and len(old.outputs) == 1 and not graph.is_graph_output(old)
    name = old.name if exclusive else graph.unique_name(f"{old.name or node.name}_fused")
    node.inputs[index] = gs.Constant(name, np.ascontiguousarray(values))


# -- BatchNormalization checks -----------------------------------------------------------------
def _bn_problem(graph, bn: gs.Node) -> str | None:
    """Why this BN is not a foldable inference BN, or None. Loads nothing."""
    if int(bn.attrs.get("training_mode", 0)) == 1:
        return "BN is in training mode (training_mode=1)"
    if int(bn.attrs.get("spatial", 1)) == 0:
        return "BN has spatial=0 (per-activation statistics)"
    if int(bn.attrs.get("is_test", 1)) == 0:
        return "BN is in training mode (is_test=0)"
    if any(_users(graph, t) for t in bn.outputs[1:]):
        return "BN has extra outputs (running/saved statistics) in use"
    if len(bn.inputs) < 5 or not all(is_constant(t) for t in bn.inputs[1:5]):
        return "BN scale/bias/mean/var are not constant"
    shapes = {constant_shape(t) for t in bn.inputs[1:5]}
    if len(shapes) != 1 or len(next(iter(shapes))) != 1:
        return f"BN parameters have shapes {sorted(shapes)}, expected one 1-D shape"
    return None


def bn_fold_factors(bn: gs.Node) -> tuple[np.ndarray, np.ndarray]:
    """(s, shift) in float64 with BN(x) = x·s + shift per channel: s = γ/√(var+ε), shift = β − μ·s."""
    gamma, beta, mean, var = (np.asarray(constant_values(t), dtype=np.float64) for t in bn.inputs[1:5])
    eps = float(bn.attrs.get("epsilon", 1e-5))
    scale = gamma / np.sqrt(var + eps)
    return scale, beta - mean * scale


# -- pre-step: BatchNormalization + Mul / Add ---------------------------------------------------
def _fold_mul_add_into_bn(graph, bn: gs.Node, stats: dict[str, Any]) -> None:
    """Fold constant per-channel Mul/Add consumers into the BN's scale/bias, repeatedly."""
    channels = constant_shape(bn.inputs[1])[0]
    rank = _bn_rank(bn)
    while True:
        out = bn.outputs[0]
        if len(out.outputs) != 1 or graph.is_graph_output(out):
            return
        user = out.outputs[0]
        vector = _elementwise_channel_vector(user, out, rank, channels) if user.op in ("Mul", "Add") else None
        if vector is None:
            return
        gamma = np.asarray(constant_values(bn.inputs[1]), dtype=np.float64)
        beta = np.asarray(constant_values(bn.inputs[2]), dtype=np.float64)
        if user.op == "Mul":
            _replace_input(graph, bn, 1, (gamma * vector).astype(constant_dtype(bn.inputs[1])))
            _replace_input(graph, bn, 2, (beta * vector).astype(constant_dtype(bn.inputs[2])))
            stats["bn_mul_fused"] += 1
        else:
            _replace_input(graph, bn, 2, (beta + vector).astype(constant_dtype(bn.inputs[2])))
            stats["bn_add_fused"] += 1
        result = user.outputs[0]
        user.inputs.clear()
        user.outputs.clear()
        bn.outputs[0] = result     # the BN now produces the Mul/Add's output (name kept)


def _bn_rank(bn: gs.Node) -> int | None:
    """Rank of the BN input, from its shape or from the producing Conv's weight."""
    x = bn.inputs[0]
    if x.shape is not None:
        return len(x.shape)
    producer = x.inputs[0] if x.inputs else None
    if producer is not None and producer.op in ("Conv", "ConvTranspose") and _present(producer, 1) is not None \
            and is_constant(producer.inputs[1]):
        return len(constant_shape(producer.inputs[1]))
    return None


def _elementwise_channel_vector(node: gs.Node, operand: gs.Tensor, rank: int | None,
                                channels: int) -> np.ndarray | None:
    """For Mul/Add(operand, c): c as a float64 per-channel vector, or None if not per-channel."""
    if len(node.inputs) != 2 or len(node.outputs) != 1:
        return None
    other = node.inputs[1] if node.inputs[0] is operand else node.inputs[0]
    if other is operand or not is_constant(other) or constant_dtype(other).kind not in FLOAT_KINDS:
        return None
    shape = constant_shape(other)
    if not _per_channel_shape(shape, rank, channels):
        return None
    return _channel_vector(constant_values(other), channels)


def _per_channel_shape(shape: tuple[int, ...], rank: int | None, channels: int) -> bool:
    """True when a constant of ``shape`` broadcasts along axis 1 only, without growing the output."""
    if int(np.prod(shape, dtype=np.int64)) == 1:
        return len(shape) <= (rank if rank is not None else 1)
    if rank is None or len(shape) > rank:
        return False
    padded = (1,) * (rank - len(shape)) + tuple(shape)
    return padded[1] == channels and all(d == 1 for i, d in enumerate(padded) if i != 1)


def _channel_vector(values: np.ndarray, channels: int) -> np.ndarray:
    flat = np.asarray(values, dtype=np.float64).reshape(-1)
    return np.broadcast_to(flat, (channels,)).copy() if flat.size == 1 else flat


# -- planning: BN -> layer ---------------------------------------------------------------------
def _plan(graph, bn: gs.Node, skip: set[str]) -> _Fold | str:
    """A fold plan, or the reason this BN stays. Loads nothing."""
    problem = _bn_problem(graph, bn)
    if problem:
        return problem
    found = _find_layer(graph, bn)
    if isinstance(found, str):
        return found
    layer, add, const_index = found
    if _skipped(bn, layer, skip) or (add is not None and add.name in skip):
        return f"'{layer.name}' is in skip_fusion_layers"
    problem = _weight_problem(graph, layer) or _bias_problem(graph, layer, add, const_index)
    if problem:
        return problem
    return _shape_plan(bn, layer, add, const_index)


def _find_layer(graph, bn: gs.Node) -> tuple[gs.Node, gs.Node | None, int] | str:
    """The layer feeding the BN (possibly through an Add of a constant bias)."""
    x = bn.inputs[0]
    producer = x.inputs[0] if x.inputs else None
    if producer is None:
        return f"input '{x.name}' is not produced by a layer"
    exclusive = _exclusive(graph, x, producer)
    add, const_index = None, -1
    if producer.op == "Add" and len(producer.inputs) == 2:
        const_index = next((i for i, t in enumerate(producer.inputs) if is_constant(t)), -1)
        source = producer.inputs[1 - const_index] if const_index >= 0 else None
        inner = source.inputs[0] if source is not None and source.inputs else None
        if inner is not None and inner.op in FUSABLE_LAYERS:
            if exclusive:
                return exclusive
            add, producer = producer, inner
            x = source
    if producer.op not in FUSABLE_LAYERS:
        return f"follows {producer.op} '{producer.name}', not a {'/'.join(FUSABLE_LAYERS)} layer"
    return _exclusive(graph, x, producer) or exclusive or (producer, add, const_index)


def _exclusive(graph, tensor: gs.Tensor, producer: gs.Node) -> str | None:
    """Folding rewrites ``tensor``: refuse when anything besides the next node reads it."""
    if graph.is_graph_output(tensor):
        return f"output '{tensor.name}' of '{producer.name}' is a graph output"
    if len(tensor.outputs) > 1:
        return f"output '{tensor.name}' of '{producer.name}' is read by {len(tensor.outputs)} nodes"
    return None


def _weight_problem(graph, layer: gs.Node) -> str | None:
    weight = _present(layer, 1)
    if weight is None or not is_constant(weight):
        return f"weight of '{layer.name}' is not constant"
    if _users(graph, weight) > 1:
        return f"weight '{weight.name}' shared by {_users(graph, weight)} nodes"
    if constant_dtype(weight).kind not in FLOAT_KINDS:
        return f"weight '{weight.name}' is {constant_dtype(weight)}, not floating point"
    return None


def _bias_tensor(layer: gs.Node, add: gs.Node | None, const_index: int) -> list[gs.Tensor]:
    tensors = [t for t in (_present(layer, 2),) if t is not None and layer.op != "MatMul"]
    if add is not None:
        tensors.append(add.inputs[const_index])
    return tensors


def _bias_problem(graph, layer: gs.Node, add: gs.Node | None, const_index: int) -> str | None:
    for bias in _bias_tensor(layer, add, const_index):
        if not is_constant(bias):
            return f"bias '{bias.name}' of '{layer.name}' is not constant"
        if _users(graph, bias) > 1:
            return f"bias '{bias.name}' shared by {_users(graph, bias)} nodes"
        if constant_dtype(bias).kind not in FLOAT_KINDS:
            return f"bias '{bias.name}' is {constant_dtype(bias)}, not floating point"
    return None


def _shape_plan(bn: gs.Node, layer: gs.Node, add: gs.Node | None, const_index: int) -> _Fold | str:
    """Channel bookkeeping per layer type; refuse when the BN's channels are not the layer's outputs."""
    channels = constant_shape(bn.inputs[1])[0]
    wshape = constant_shape(layer.inputs[1])
    groups, axis = 1, 0
    if layer.op == "Conv":
        if len(wshape) < 3:
            return f"weight of '{layer.name}' is {len(wshape)}-D, expected 3-D to 5-D"
        outputs, rank = wshape[0], len(wshape)
    elif layer.op == "ConvTranspose":
        groups = int(layer.attrs.get("group", 1))
        if len(wshape) < 3:
            return f"weight of '{layer.name}' is {len(wshape)}-D, expected 3-D to 5-D"
        outputs, rank, axis = wshape[1] * groups, len(wshape), 1
    else:
        if len(wshape) != 2:
            return f"weight of '{layer.name}' is {len(wshape)}-D, expected 2-D"
        trans_b = layer.op == "Gemm" and int(layer.attrs.get("transB", 0)) == 1
        axis = 0 if trans_b else 1
        outputs, rank = wshape[axis], 2
        problem = _matmul_rank_problem(layer) if layer.op == "MatMul" else None
        if problem:
            return problem
    if outputs != channels:
        return f"BN has {channels} channels but '{layer.name}' has {outputs} outputs"
    if add is not None and not _per_channel_shape(constant_shape(add.inputs[const_index]), rank, channels):
        return f"Add '{add.name}' between '{layer.name}' and the BN is not a per-channel bias"
    return _Fold(bn, layer, add, const_index, axis, groups, rank)


def _matmul_rank_problem(layer: gs.Node) -> str | None:
    """BN normalises axis 1; that is the MatMul's output features only for a 2-D output."""
    a = layer.inputs[0]
    out = layer.outputs[0]
    shape = out.shape if out.shape is not None else a.shape
    if shape is None:
        return f"rank of '{layer.name}' output unknown: cannot tell that the BN normalises its features"
    if len(shape) != 2:
        return f"'{layer.name}' output is {len(shape)}-D: the BN normalises axis 1, not the output features"
    return None


# -- rewriting ---------------------------------------------------------------------------------
def _apply(graph, plan: _Fold) -> None:
    scale, shift = bn_fold_factors(plan.bn)
    layer = plan.layer
    weight = layer.inputs[1]
    w = constant_values(weight)
    _replace_input(graph, layer, 1, _scale_weight(w, scale, plan.weight_axis, plan.groups))
    if plan.add is not None:
        _fold_bias_into_add(graph, plan, scale, shift)
        _fold_layer_bias(graph, layer, scale, np.zeros_like(shift), w.dtype)
    elif layer.op == "MatMul":
        _insert_bias_add(graph, layer, plan.bn, shift.astype(w.dtype))
        return
    else:
        _fold_layer_bias(graph, layer, scale, shift, w.dtype)
    _bypass_bn(plan.bn, plan.add or layer)


def _bypass_bn(bn: gs.Node, new_producer: gs.Node) -> None:
    """``new_producer`` takes over the BN's output tensor, so its name (maybe a graph output) is kept."""
    y = bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    new_producer.outputs[0] = y


def _scale_weight(w: np.ndarray, scale: np.ndarray, axis: int, groups: int) -> np.ndarray:
    """W·s along the output-channel ``axis`` (ConvTranspose: axis 1 within each group), in chunks."""
    out = np.empty(w.shape, dtype=w.dtype)
    rows = w.shape[0]
    per_group_rows = rows // groups
    per_group_out = scale.size // groups
    step = max(1, CHUNK_ELEMENTS // max(1, int(np.prod(w.shape[1:], dtype=np.int64))))
    tail = (1,) * (w.ndim - 2)
    for g in range(groups):
        start, stop = g * per_group_rows, (g + 1) * per_group_rows
        for a in range(start, stop, step):
            b = min(a + step, stop)
            if axis == 0:
                factor = scale[a:b].reshape((-1,) + (1,) * (w.ndim - 1))
            else:
                factor = scale[g * per_group_out:(g + 1) * per_group_out].reshape((1, -1) + tail)
            out[a:b] = w[a:b].astype(np.float64) * factor
    return out


def _fold_layer_bias(graph, layer: gs.Node, scale: np.ndarray, shift: np.ndarray, dtype: np.dtype) -> None:
    """Conv/ConvTranspose: b' = b·s + shift; Gemm: C' = β_gemm·C·s + shift and beta := 1."""
    bias = _present(layer, 2)
    if layer.op == "Gemm":
        if bias is None and not shift.any():
            return
        c = 0.0 if bias is None else np.asarray(constant_values(bias), dtype=np.float64)
        new = float(layer.attrs.get("beta", 1.0)) * c * scale + shift
        layer.attrs["beta"] = 1.0
    else:
        if bias is None and not shift.any():
            return
        b = np.zeros(scale.shape) if bias is None else np.asarray(constant_values(bias), dtype=np.float64)
        new = b * scale + shift
    _set_input(graph, layer, 2, new.astype(dtype), f"{layer.name}.bias")


def _set_input(graph, node: gs.Node, index: int, values: np.ndarray, base: str) -> None:
    if _present(node, index) is not None:
        _replace_input(graph, node, index, values)
        return
    const = gs.Constant(graph.unique_name(base), np.ascontiguousarray(values))
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if len(node.inputs) == index:
        node.inputs.append(const)
    else:
        node.inputs[index] = const


def _fold_bias_into_add(graph, plan: _Fold, scale: np.ndarray, shift: np.ndarray) -> None:
    """a' = a·s + shift, shaped [C, 1, ...] so it broadcasts on axis 1 of the layer output."""
    const = plan.add.inputs[plan.add_const_index]
    a = _channel_vector(constant_values(const), scale.size)
    new = (a * scale + shift).reshape((-1,) + (1,) * (plan.out_rank - 2))
    _replace_input(graph, plan.add, plan.add_const_index, new.astype(constant_dtype(const)))


def _insert_bias_add(graph, layer: gs.Node, bn: gs.Node, bias: np.ndarray) -> None:
    """MatMul has no bias input: the BN becomes an Add of a constant [N] bias (AMCT-matchable)."""
    x, y = bn.inputs[0], bn.outputs[0]
    bn.inputs.clear()
    bn.outputs.clear()
    const = gs.Constant(graph.unique_name(f"{layer.name}.bias"), np.ascontiguousarray(bias))
    add = gs.Node("Add", name=graph.unique_name(f"{layer.name}_bias"), inputs=[x, const], outputs=[y])
    graph.gs.nodes.append(add)
