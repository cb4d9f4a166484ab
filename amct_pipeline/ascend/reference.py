"""Execute an Ascend deploy model on the CPU with ``onnx.reference.ReferenceEvaluator``.

The deploy model (SPEC 5.3) holds AscendQuant / AscendDequant / AscendAntiQuant /
AscendWeightQuant / AscendRequant nodes and standard Conv / ConvTranspose / Gemm / MatMul /
AveragePool nodes with integer inputs. This module plugs the numpy kernels of :mod:`.ops` into the
ONNX reference evaluator:

* Ascend nodes are accepted in any domain (AMCT writes them in the default domain ``""`` for ATC;
  ``"amct.customop"``, ``"ascend"`` or another custom domain work too). On a private copy of the
  model they are moved to the private domain :data:`PRIVATE_DOMAIN` (ONNX might one day define an
  operator of the same name in the default domain, and a custom domain needs an opset import), and
  are evaluated with deploy semantics (AscendQuant outputs integer codes).
* Every Ascend node is checked before evaluation: an unknown or missing attribute, a bad value or
  a wrong input count is an :class:`~.errors.AscendError` naming the node, e.g.
  ``unknown attribute 'foo' on AscendQuant node 'conv1.quant'``.
* Conv, ConvTranspose, Gemm, MatMul and AveragePool are overridden: integer inputs run the exact
  integer kernels, float inputs fall back to the standard reference implementation of the model's
  opset. Unfused BatchNormalization runs in inference mode (onnx's reference would use batch
  statistics, see :func:`_inference_batchnorm`).
* ``float_ops="onnxruntime"`` runs every other node (LayerNormalization, Softmax, Gelu, float
  Conv/MatMul of unquantized layers, ...) in onnxruntime, one node at a time with graph optimisation
  off, instead of the numpy reference: the float operators between quantized layers then compute
  exactly what they compute in the fake-quant model, so float rounding differences between two
  implementations cannot flip a quantization code downstream (``verify-deploy`` uses this).
  ``float_ops="reference"`` (default) keeps everything in numpy.
* ``input_offsets="atc"`` (default) emulates the Ascend compiler's activation-offset compensation:
  an integer layer whose input comes from an AscendQuant with ``offset != 0`` (directly or through
  Identity/Reshape/Flatten/Squeeze/Unsqueeze/Transpose/MaxPool/Slice) computes on ``q - offset``,
  because AMCT leaves that compensation to ATC (SPEC 5.3). A lowering must therefore *not* fold
  ``-offset_d * sum(w)`` into the deploy bias. ``input_offsets="none"`` gives plain ONNX integer
  semantics (the codes themselves are multiplied).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
from onnx.reference import ReferenceEvaluator
from onnx.reference.op_run import OpRun
from onnx.reference.ops import load_op

from . import kernels, ops
from .errors import AscendError
from .schemas import ASCEND_OP_SPECS, all_graphs

__all__ = [
    "ASCEND_OPS",
    "PRIVATE_DOMAIN",
    "DeployEvaluator",
    "check_ascend_node",
    "check_deploy_model",
    "make_deploy_evaluator",
    "run_deploy_model",
]

PRIVATE_DOMAIN = "amct_pipeline.ascend.reference"

# op type -> (required attributes, optional attributes, allowed input counts), from the schemas
ASCEND_OPS: dict[str, tuple[frozenset[str], frozenset[str], tuple[int, ...]]] = {
    op: (spec.required, spec.optional, (len(spec.inputs),)) for op, spec in ASCEND_OP_SPECS.items()}

# single-data-input ops through which an AscendQuant zero point travels unchanged
_PASS_THROUGH = {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "MaxPool", "Slice"}
# op type -> indices of inputs whose zero point the integer kernel subtracts
_ZP_INPUTS = {"Conv": (0,), "ConvTranspose": (0,), "Gemm": (0, 1), "MatMul": (0, 1), "AveragePool": (0,)}


def _label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"'{node.name}'"
    out = node.output[0] if node.output else "?"
    return f"(unnamed, output '{out}')"


def _where(node: onnx.NodeProto) -> str:
    return f"{node.op_type} node {_label(node)}"


def check_ascend_node(node: onnx.NodeProto) -> None:
    """Validate one Ascend node's attributes and inputs; AscendError naming the node otherwise."""
    required, optional, n_inputs = ASCEND_OPS[node.op_type]
    attrs = {}
    for att in node.attribute:
        if att.name not in required and att.name not in optional:
            raise AscendError(f"unknown attribute '{att.name}' on {_where(node)}")
        if att.ref_attr_name:
            raise AscendError(f"attribute '{att.name}' on {_where(node)} refers to a function attribute; "
                              "not supported")
        attrs[att.name] = onnx.helper.get_attribute_value(att)
    for name in sorted(required - set(attrs)):
        raise AscendError(f"{_where(node)} lacks required attribute '{name}'")
    inputs = [i for i in node.input]
    while inputs and not inputs[-1]:
        inputs.pop()
    if len(inputs) not in n_inputs or not all(inputs):
        raise AscendError(f"{_where(node)} has {len(inputs)} inputs, expected {' or '.join(map(str, n_inputs))}")
    if len(node.output) != 1:
        raise AscendError(f"{_where(node)} has {len(node.output)} outputs, expected 1")
    try:
        if "dst_type" in attrs:
            ops.quant_range(attrs["dst_type"])
        if "round_mode" in attrs:
            ops._round_fn(attrs["round_mode"])
        if "dtype" in attrs:
            ops.output_dtype(attrs["dtype"])
        if "scale" in attrs:
            ops._scalar("scale", attrs["scale"], positive=node.op_type == "AscendQuant")
        if "offset" in attrs:
            ops._scalar("offset", attrs["offset"])
        for flag in ("sqrt_mode", "relu_flag"):
            if flag in attrs and attrs[flag] not in (0, 1):
                raise AscendError(f"{flag} must be 0 or 1, got {attrs[flag]!r}")
    except AscendError as exc:
        raise AscendError(f"{_where(node)}: {exc}") from None


def check_deploy_model(model: onnx.ModelProto) -> None:
    """Validate every Ascend node of ``model`` (subgraphs included)."""
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.op_type in ASCEND_OPS:
                check_ascend_node(node)


def _zero_points(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor name -> zero point of integer tensors produced by AscendQuant with a non-zero offset."""
    zp: dict[str, int] = {}
    for graph in all_graphs(model.graph):
        for node in graph.node:
            if node.op_type == "AscendQuant":
                off = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "offset"), 0.0)
                if float(off) != 0.0 and float(off) == round(float(off)):
                    zp[node.output[0]] = int(round(float(off)))
            elif node.op_type in _PASS_THROUGH and node.input and node.input[0] in zp:
                for out in node.output[:1]:
                    zp[out] = zp[node.input[0]]
            elif node.op_type == "Concat" and node.input:
                vals = {zp.get(i, 0) for i in node.input}
                if len(vals) == 1 and 0 not in vals:
                    zp[node.output[0]] = vals.pop()
    return zp


# ---------------------------------------------------------------------------------------------
# OpRun classes


def _flag(attrs: Mapping[str, Any], name: str) -> bool:
    return bool(attrs.get(name, 0))


def _ascend_classes(quant_convention: str) -> list[type[OpRun]]:
    def compute_quant(x, **a):
        return ops.ascend_quant(x, a["scale"], a["offset"], sqrt_mode=_flag(a, "sqrt_mode"),
                                round_mode=a.get("round_mode", "Round"), dst_type=a.get("dst_type", "INT8"),
                                convention=quant_convention)

    def compute_dequant(x, deq, **a):
        return ops.ascend_dequant(x, deq, sqrt_mode=_flag(a, "sqrt_mode"), relu_flag=_flag(a, "relu_flag"),
                                  dtype=a.get("dtype", 0))

    def compute_anti(x, **a):
        return ops.ascend_anti_quant(x, a["scale"], a["offset"], sqrt_mode=_flag(a, "sqrt_mode"),
                                     dtype=a.get("dtype", 0))

    def compute_wq(x, offset, **a):
        return ops.ascend_weight_quant(x, offset, a.get("dst_type", "INT8"))

    def compute_req(x, req, **a):
        return ops.ascend_requant(x, req, relu_flag=_flag(a, "relu_flag"))

    table = {"AscendQuant": compute_quant, "AscendDequant": compute_dequant, "AscendAntiQuant": compute_anti,
             "AscendWeightQuant": compute_wq, "AscendRequant": compute_req}

    def make(op_type: str, fn: Callable[..., np.ndarray]) -> type[OpRun]:
        def __init__(self, onnx_node, run_params, schema=None):
            check_ascend_node(onnx_node)
            OpRun.__init__(self, onnx_node, run_params, schema)

        def _run(self, *inputs, **attrs):
            try:
                return (fn(*inputs, **attrs),)
            except AscendError as exc:
                raise AscendError(f"{_where(self.onnx_node)}: {exc}") from None

        return type(op_type, (OpRun,), {"op_domain": PRIVATE_DOMAIN, "__init__": __init__, "_run": _run})

    return [make(op, fn) for op, fn in table.items()]


def _is_int(x) -> bool:
    return isinstance(x, np.ndarray) and x.dtype != bool and np.issubdtype(x.dtype, np.integer)


def _int_conv(inputs, a, zps, on_overflow):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    return kernels.conv_int(x, w, b, a.get("strides"), a.get("pads"), a.get("dilations"), a.get("group") or 1,
                        auto_pad=a.get("auto_pad") or "NOTSET", x_offset=zps[0], on_overflow=on_overflow)


def _int_conv_transpose(inputs, a, zps, on_overflow):
    x, w = inputs[0], inputs[1]
    b = inputs[2] if len(inputs) > 2 else None
    return kernels.conv_transpose_int(x, w, b, a.get("strides"), a.get("pads"), a.get("dilations"),
                                  a.get("group") or 1, a.get("output_padding"), a.get("output_shape"),
                                  auto_pad=a.get("auto_pad") or "NOTSET", x_offset=zps[0], on_overflow=on_overflow)


def _int_gemm(inputs, a, zps, on_overflow):
    c = inputs[2] if len(inputs) > 2 else None
    alpha = 1.0 if a.get("alpha") is None else a["alpha"]
    beta = 1.0 if a.get("beta") is None else a["beta"]
    return kernels.gemm_int(inputs[0], inputs[1], c, a.get("transA") or 0, a.get("transB") or 0, alpha=alpha,
                        beta=beta, a_offset=zps[0], b_offset=zps[1], on_overflow=on_overflow)


def _int_matmul(inputs, a, zps, on_overflow):
    return kernels.matmul_int(inputs[0], inputs[1], a_offset=zps[0], b_offset=zps[1], on_overflow=on_overflow)


def _int_avgpool(inputs, a, zps, on_overflow):
    return kernels.avgpool_int(inputs[0], a["kernel_shape"], a.get("strides"), a.get("pads"),
                           ceil_mode=a.get("ceil_mode") or 0, count_include_pad=a.get("count_include_pad") or 0,
                           dilations=a.get("dilations"), auto_pad=a.get("auto_pad") or "NOTSET", x_offset=zps[0])


_INT_KERNELS = {"Conv": _int_conv, "ConvTranspose": _int_conv_transpose, "Gemm": _int_gemm,
                "MatMul": _int_matmul, "AveragePool": _int_avgpool}


class _OrtNode:
    """One node of the deploy model run alone in onnxruntime (graph optimisation off, as the fake-quant
    model is run by ``verify-deploy``). Inputs that are initializers of the model stay initializers
    (onnxruntime pre-packs constant weights, as it does in the whole model). One session per input
    signature (dtypes and ranks); None when onnxruntime cannot run the node (the caller falls back)."""

    def __init__(self, node: onnx.NodeProto, opset_imports, ir_version: int,
                 constants: Mapping[str, onnx.TensorProto]) -> None:
        self.node, self.opset_imports, self.ir_version, self.constants = node, list(opset_imports), ir_version, constants
        self.sessions: dict[tuple, Any] = {}

    def run(self, inputs: Sequence[Any]) -> tuple | None:
        if not all(x is None or isinstance(x, np.ndarray) for x in inputs):
            return None
        names = list(self.node.input)
        feeds = {n: x for n, x in zip(names, inputs) if n and x is not None and n not in self.constants}
        key = tuple((n, x.dtype.str, x.ndim) for n, x in feeds.items())
        if key not in self.sessions:
            self.sessions[key] = self._session(feeds)
        session = self.sessions[key]
        if session is None:
            return None
        outputs = [o for o in self.node.output if o]
        values = dict(zip(outputs, session.run(outputs, feeds)))
        return tuple(values.get(o) for o in self.node.output)

    def _session(self, feeds: Mapping[str, np.ndarray]):
        from onnx import helper

        from ..runtime.ort import make_session
        try:
            graph_inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(x.dtype),
                                                          [f"{n}_d{i}" for i in range(x.ndim)])
                            for n, x in feeds.items()]
            inits = [self.constants[n] for n in dict.fromkeys(self.node.input) if n in self.constants]
            graph = helper.make_graph([self.node], "node", graph_inputs, [], inits)
            model = helper.make_model(graph, opset_imports=self.opset_imports)
            model.ir_version = self.ir_version
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
            types = {v.name: v.type for v in inferred.graph.value_info}
            for out in self.node.output:
                if not out:
                    continue
                value = onnx.ValueInfoProto(name=out)
                if out in types and types[out].tensor_type.elem_type:
                    value.type.tensor_type.elem_type = types[out].tensor_type.elem_type
                else:
                    return None
                model.graph.output.append(value)
            # one session per node: no thread pool of its own (dozens of spinning pools would starve
            # the machine); the kernels split work by rows and channels, so results do not depend on it
            return make_session(model, optimize=False, threads=1, config={"session.intra_op.allow_spinning": "0"})
        except Exception:  # an op or type onnxruntime lacks: the numpy reference runs the node instead
            return None


def _ort_runner(self, ort_nodes) -> _OrtNode | None:
    if ort_nodes is None or self.onnx_node.op_type in ASCEND_OPS:
        return None
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in self.onnx_node.attribute):
        return None
    key = id(self)
    if key not in ort_nodes.runners:
        ort_nodes.runners[key] = _OrtNode(self.onnx_node, ort_nodes.opset_imports, ort_nodes.ir_version,
                                          ort_nodes.constants)
    return ort_nodes.runners[key]


class _OrtNodes:
    """What the onnxruntime-backed classes share: the model's opsets and top-level initializers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.opset_imports = [i for i in model.opset_import if i.domain in ("", "ai.onnx")]
        self.ir_version = model.ir_version
        self.constants = {t.name: t for t in model.graph.initializer}
        self.runners: dict[int, _OrtNode] = {}


def _float_classes(model: onnx.ModelProto, opset: int, ort_nodes: _OrtNodes, skip: set[str]) -> list[type[OpRun]]:
    """Classes running each remaining default-domain op type of ``model`` in onnxruntime (falling back to
    the numpy reference where onnxruntime cannot)."""
    classes = []
    op_types = sorted({n.op_type for g in all_graphs(model.graph) for n in g.node if n.domain in ("", "ai.onnx")}
                      - set(ASCEND_OPS) - skip)
    for op_type in op_types:
        try:
            base = load_op("", op_type, opset, evaluator_cls=ReferenceEvaluator)
            schema = onnx.defs.get_schema(op_type, opset, "")
        except Exception:  # not in the reference or not in this opset: leave it to the evaluator's own error
            continue

        def _run(self, *inputs, _base=base, **attrs):
            runner = _ort_runner(self, ort_nodes)
            result = runner.run(inputs) if runner is not None else None
            return result if result is not None else _base._run(self, *inputs, **attrs)

        def run(self, *args, _base=base, **kwargs):
            runner = _ort_runner(self, ort_nodes)
            if runner is not None and not kwargs.get("linked_attributes") and not kwargs.get("context"):
                result = runner.run(args)
                if result is not None:
                    return result if len(result) > 1 else (result[0],)
            return _base.run(self, *args, **kwargs)

        classes.append(type(op_type, (base,), {"op_domain": "", "op_schema": schema, "_run": _run, "run": run}))
    return classes


def _layer_classes(opset: int, zero_points: Mapping[str, int], on_overflow: str,
                   ort_nodes: _OrtNodes | None = None) -> list[type[OpRun]]:
    classes = []
    for op_type, kernel in _INT_KERNELS.items():
        base = load_op("", op_type, opset, evaluator_cls=ReferenceEvaluator)

        def _run(self, *inputs, _base=base, _kernel=kernel, **attrs):
            if inputs and _is_int(inputs[0]):
                node = self.onnx_node
                zps = [zero_points.get(node.input[i], 0) if i < len(node.input) else 0 for i in (0, 1)]
                try:
                    return (_kernel(inputs, attrs, zps, on_overflow),)
                except AscendError as exc:
                    raise AscendError(f"{_where(node)}: {exc}") from None
            runner = _ort_runner(self, ort_nodes)
            result = runner.run(inputs) if runner is not None else None
            if result is not None:
                return result
            return _base._run(self, *inputs, **attrs)

        def run(self, *args, _base=base, **kwargs):
            # MatMul's standard class insists on output dtype == input dtype; int8 -> int32 is intended
            if args and _is_int(args[0]):
                return OpRun.run(self, *args, **kwargs)
            return _base.run(self, *args, **kwargs)

        # the class is named after the op (new_ops key); pin the schema of the model's opset so the
        # attribute defaults match the versioned base class (e.g. AveragePool_11 has no dilations)
        schema = onnx.defs.get_schema(op_type, opset, "")
        classes.append(type(op_type, (base,), {"op_domain": "", "op_schema": schema, "_run": _run, "run": run}))
    classes.append(_inference_batchnorm(opset))
    return classes


def _inference_batchnorm(opset: int) -> type[OpRun]:
    """BatchNormalization in inference mode.

    onnx's reference ``BatchNormalization_9`` switches to training mode whenever ``momentum`` is
    set, and the evaluator fills it from the schema default, so unfused BatchNormalization nodes
    would use batch statistics. A deploy model is inference: single-output nodes use the stored
    mean and variance.
    """
    base = load_op("", "BatchNormalization", opset, evaluator_cls=ReferenceEvaluator)

    def _run(self, x, scale, bias, mean, var, **attrs):
        if len(self.onnx_node.output) > 1 or attrs.get("training_mode"):
            return base._run(self, x, scale, bias, mean, var, **attrs)
        eps = 1e-5 if attrs.get("epsilon") is None else attrs["epsilon"]
        shape = (1, -1) + (1,) * (x.ndim - 2)
        y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + np.asarray(eps, var.dtype))
        return ((y * scale.reshape(shape) + bias.reshape(shape)).astype(x.dtype),)

    schema = onnx.defs.get_schema("BatchNormalization", opset, "")
    return type("BatchNormalization", (base,), {"op_domain": "", "op_schema": schema, "_run": _run})


# ---------------------------------------------------------------------------------------------
# Public API


def _default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return int(imp.version)
    return onnx.defs.onnx_opset_version()


def _private_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for graph in all_graphs(copy.graph):
        for node in graph.node:
            if node.op_type in ASCEND_OPS:
                node.domain = PRIVATE_DOMAIN
    if not any(imp.domain == PRIVATE_DOMAIN for imp in copy.opset_import):
        copy.opset_import.append(onnx.helper.make_opsetid(PRIVATE_DOMAIN, 1))
    return copy


class DeployEvaluator:
    """A reusable evaluator of one deploy model (build once, :meth:`run` many batches)."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike, *, quant_convention: str = "amct",
                 input_offsets: str = "atc", on_overflow: str = "error", float_ops: str = "reference",
                 verbose: int = 0) -> None:
        if isinstance(model, (str, os.PathLike)):
            model = onnx.load(os.fspath(model))
        if quant_convention not in ("amct", "cann"):
            raise AscendError(f"quant_convention must be 'amct' or 'cann', got {quant_convention!r}")
        if input_offsets not in ("atc", "none"):
            raise AscendError(f"input_offsets must be 'atc' or 'none', got {input_offsets!r}")
        if on_overflow not in ("error", "saturate"):
            raise AscendError(f"on_overflow must be 'error' or 'saturate', got {on_overflow!r}")
        if float_ops not in ("reference", "onnxruntime"):
            raise AscendError(f"float_ops must be 'reference' or 'onnxruntime', got {float_ops!r}")
        check_deploy_model(model)
        self.model = _private_copy(model)
        zps = _zero_points(self.model) if input_offsets == "atc" else {}
        opset = _default_opset(model)
        ort_nodes = _OrtNodes(self.model) if float_ops == "onnxruntime" else None
        new_ops = _ascend_classes(quant_convention) + _layer_classes(opset, zps, on_overflow, ort_nodes)
        if ort_nodes is not None:   # BatchNormalization too: onnxruntime runs it in inference mode
            new_ops = [c for c in new_ops if c.__name__ != "BatchNormalization"]
            new_ops += _float_classes(self.model, opset, ort_nodes, set(_INT_KERNELS))
        self.input_names = [i.name for i in self.model.graph.input
                            if i.name not in {t.name for t in self.model.graph.initializer}]
        self.output_names = [o.name for o in self.model.graph.output]
        self._ref = ReferenceEvaluator(self.model, new_ops=new_ops, verbose=verbose)

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray],
            output_names: Sequence[str] | None = None) -> list[np.ndarray]:
        """Outputs for ``feeds`` (a name -> array mapping, or arrays in graph-input order)."""
        if not isinstance(feeds, Mapping):
            feeds = list(feeds)
            if len(feeds) != len(self.input_names):
                raise AscendError(f"got {len(feeds)} inputs, the model takes {len(self.input_names)}: "
                                  f"{', '.join(self.input_names)}")
            feeds = dict(zip(self.input_names, feeds))
        missing = [n for n in self.input_names if n not in feeds]
        if missing:
            raise AscendError(f"missing model input(s): {', '.join(missing)}")
        return list(self._ref.run(list(output_names) if output_names else None,
                                  {k: np.asarray(v) for k, v in feeds.items()}))


def make_deploy_evaluator(model, **options) -> DeployEvaluator:
    """Build a :class:`DeployEvaluator` (options: quant_convention, input_offsets, on_overflow, float_ops, verbose)."""
    return DeployEvaluator(model, **options)


def run_deploy_model(model: onnx.ModelProto | str | os.PathLike,
                     feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                     output_names: Sequence[str] | None = None, **options) -> list[np.ndarray]:
    """Run a deploy model once on the CPU reference; returns the outputs as numpy arrays."""
    return DeployEvaluator(model, **options).run(feeds, output_names)
