"""The Ascend operators as ONNX sees them: their schemas, and ``onnx.checker`` for a deploy model
without touching onnx's process-wide schema registry.

AMCT writes AscendQuant / AscendDequant / AscendAntiQuant / AscendWeightQuant / AscendRequant in the
default ONNX domain (what ATC ``--framework=5`` reads). ``onnx.checker`` rejects an operator of the
default domain it has no schema for, and onnx has only one, process-wide, schema registry: registering
the Ascend schemas there would change what every later check in the process accepts (two pipelines in
one process could then behave differently from the same pipelines in two processes). So:

* :func:`check_model` checks a deploy model without registering anything: the Ascend nodes are
  verified here against :data:`ASCEND_OP_SPECS` (input and output counts, known attributes, attribute
  types, required attributes: what onnx's schema verification does), and the rest of the model by
  ``onnx.checker`` on a serialized copy whose Ascend nodes sit in a private domain. The model itself is
  left as it was (it is edited and restored before the check runs, never while it runs).
* :func:`register_ascend_schemas` (opt-in, for users who want to run ``onnx.checker`` on a deploy model
  themselves) and the context manager :func:`ascend_schemas_registered` (registers for the duration of a
  ``with`` block and removes what it registered) give onnx the same schemas.
"""
from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Iterable, Iterator

import onnx

__all__ = [
    "ASCEND_OP_SPECS",
    "AscendOpSpec",
    "all_graphs",
    "CHECK_DOMAIN",
    "CONVENTION_METADATA_KEY",
    "ascend_op_schemas",
    "ascend_schemas_registered",
    "check_model",
    "register_ascend_schemas",
    "unregister_ascend_schemas",
]

# the deploy model's metadata key for the AscendQuant rounding convention ("amct" | "cann")
CONVENTION_METADATA_KEY = "amct_pipeline.ascend.quant_convention"
# the domain the Ascend nodes are moved to on the copy that onnx.checker sees (never written)
CHECK_DOMAIN = "amct_pipeline.ascend.check"
SCHEMA_VERSION = 1

_FLOATS = ("tensor(float)", "tensor(float16)", "tensor(double)")
_INTS = ("tensor(int8)", "tensor(int16)", "tensor(int32)", "tensor(uint8)")
_A = onnx.AttributeProto


@dataclass(frozen=True)
class AscendOpSpec:
    """One Ascend operator (CANN GE prototype, SPEC 5.1), in the terms of an ONNX schema.

    ``inputs`` / ``outputs``: (name, type parameter), all single; ``attributes``: (name, AttributeProto
    type, required). Attribute types are the ones AMCT writes (``dst_type`` and ``round_mode`` strings;
    flags and ``dtype`` ints).
    """

    inputs: tuple[tuple[str, str], ...]
    outputs: tuple[tuple[str, str], ...]
    type_constraints: tuple[tuple[str, tuple[str, ...]], ...]
    attributes: tuple[tuple[str, int, bool], ...]

    @property
    def required(self) -> frozenset[str]:
        return frozenset(name for name, _, required in self.attributes if required)

    @property
    def optional(self) -> frozenset[str]:
        return frozenset(name for name, _, required in self.attributes if not required)


ASCEND_OP_SPECS: dict[str, AscendOpSpec] = {
    "AscendQuant": AscendOpSpec(
        (("x", "T"),), (("y", "Q"),), (("T", _FLOATS), ("Q", _INTS)),
        (("scale", _A.FLOAT, True), ("offset", _A.FLOAT, True), ("sqrt_mode", _A.INT, False),
         ("round_mode", _A.STRING, False), ("dst_type", _A.STRING, False))),
    "AscendDequant": AscendOpSpec(
        (("x", "I"), ("deq_scale", "D")), (("y", "T"),),
        (("I", _INTS + _FLOATS), ("D", ("tensor(uint64)",) + _FLOATS), ("T", _FLOATS)),
        (("sqrt_mode", _A.INT, False), ("relu_flag", _A.INT, False), ("dtype", _A.INT, False))),
    "AscendAntiQuant": AscendOpSpec(
        (("x", "Q"),), (("y", "T"),), (("Q", _INTS), ("T", _FLOATS)),
        (("scale", _A.FLOAT, True), ("offset", _A.FLOAT, True), ("sqrt_mode", _A.INT, False),
         ("dtype", _A.INT, False))),
    "AscendWeightQuant": AscendOpSpec(
        (("x", "Q"), ("offset", "Q")), (("y", "Q"),), (("Q", _INTS),),
        (("dst_type", _A.STRING, False),)),
    "AscendRequant": AscendOpSpec(
        (("x", "I"), ("req_scale", "D")), (("y", "Q"),),
        (("I", _INTS), ("D", ("tensor(uint64)",)), ("Q", _INTS)),
        (("relu_flag", _A.INT, False),)),
}


# -- checking without the registry ------------------------------------------------------------------
def all_graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """``graph`` and its subgraphs (If / Loop / Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for att in node.attribute:
            if att.type == onnx.AttributeProto.GRAPH:
                yield from all_graphs(att.g)
            elif att.type == onnx.AttributeProto.GRAPHS:
                for g in att.graphs:
                    yield from all_graphs(g)


def _invalid(node: onnx.NodeProto, message: str) -> onnx.checker.ValidationError:
    return onnx.checker.ValidationError(
        f"{message} ==> Context: Bad node spec for node. Name: {node.name} OpType: {node.op_type}")


def _verify_node(node: onnx.NodeProto, spec: AscendOpSpec) -> None:
    """What onnx's schema verification checks (all formal parameters are single)."""
    if len(node.input) != len(spec.inputs):
        raise _invalid(node, f"Node ({node.name}) has input size {len(node.input)} not in range "
                             f"[min={len(spec.inputs)}, max={len(spec.inputs)}].")
    for index, name in enumerate(node.input):
        if not name:
            raise _invalid(node, f"Node ({node.name})'s input {index} is marked single but has an empty "
                                 "string in the graph")
    if len(node.output) != len(spec.outputs):
        raise _invalid(node, f"Node ({node.name}) has output size {len(node.output)} not in range "
                             f"[min={len(spec.outputs)}, max={len(spec.outputs)}].")
    types = {name: kind for name, kind, _ in spec.attributes}
    present = set()
    for att in node.attribute:
        if att.name not in types:
            raise _invalid(node, f"Unrecognized attribute: {att.name} for operator {node.op_type}")
        if not att.ref_attr_name and att.type != types[att.name]:
            raise _invalid(node, f"Mismatched attribute type in '{node.name} : {att.name}'")
        present.add(att.name)
    for name in sorted(spec.required - present):
        raise _invalid(node, f"Required attribute '{name}' is missing.")


def check_model(model: onnx.ModelProto) -> None:
    """``onnx.checker.check_model`` for a model with Ascend nodes, with the Ascend schemas applied to
    the default-domain Ascend nodes but nothing registered with onnx (see the module docstring).

    Raises ``onnx.checker.ValidationError``. ``model`` is edited and restored before the check runs
    (do not share it with another thread meanwhile); its serialized bytes are unchanged afterwards.
    """
    moved: list[tuple[onnx.NodeProto, bool, str]] = []
    for graph in all_graphs(model.graph):
        for node in graph.node:
            spec = ASCEND_OP_SPECS.get(node.op_type)
            if spec is not None and node.domain in ("", "ai.onnx"):
                _verify_node(node, spec)
                moved.append((node, node.HasField("domain"), node.domain))
    if not moved:
        onnx.checker.check_model(model)
        return
    imported = any(imp.domain == CHECK_DOMAIN for imp in model.opset_import)
    try:
        for node, _, _ in moved:
            node.domain = CHECK_DOMAIN
        if not imported:
            model.opset_import.append(onnx.helper.make_opsetid(CHECK_DOMAIN, SCHEMA_VERSION))
        serialized = model.SerializeToString()
    finally:
        if not imported:
            del model.opset_import[-1]
        for node, had_domain, domain in moved:
            if had_domain:
                node.domain = domain
            else:
                node.ClearField("domain")
    onnx.checker.check_model(serialized)


# -- the registry, opt-in ---------------------------------------------------------------------------
_LOCK = threading.Lock()


def ascend_op_schemas() -> list[onnx.defs.OpSchema]:
    """The Ascend operators as ``OpSchema`` objects of the default domain, version 1 (not registered)."""
    S = onnx.defs.OpSchema
    kinds = {_A.FLOAT: S.AttrType.FLOAT, _A.INT: S.AttrType.INT, _A.STRING: S.AttrType.STRING}
    schemas = []
    for op, spec in ASCEND_OP_SPECS.items():
        schemas.append(S(
            op, "", SCHEMA_VERSION,
            inputs=[S.FormalParameter(name, kind) for name, kind in spec.inputs],
            outputs=[S.FormalParameter(name, kind) for name, kind in spec.outputs],
            type_constraints=[(name, list(allowed), "") for name, allowed in spec.type_constraints],
            attributes=[S.Attribute(name, kinds[kind], "", required=required)
                        for name, kind, required in spec.attributes],
            doc=f"Ascend {op} (CANN GE prototype, SPEC 5.1); registered by amct-pipeline."))
    return schemas


def register_ascend_schemas() -> list[str]:
    """Register the Ascend schemas in the default ONNX domain (version 1), so ``onnx.checker`` accepts
    deploy models written for ATC. A process-wide, lasting change: pipelines never call this (they use
    :func:`check_model`); prefer :func:`ascend_schemas_registered`.

    Idempotent; an operator someone else registered already is left alone. Returns the operators this
    call registered.
    """
    from onnx import defs
    registered = []
    with _LOCK:
        for schema in ascend_op_schemas():
            if defs.has(schema.name, ""):
                continue
            try:
                defs.register_schema(schema)
            except Exception:      # registered concurrently by another library: fine either way
                if not defs.has(schema.name, ""):
                    raise
                continue
            registered.append(schema.name)
    return registered


def unregister_ascend_schemas(ops: Iterable[str]) -> None:
    """Remove the Ascend schemas ``ops`` (as returned by :func:`register_ascend_schemas`) from onnx."""
    from onnx import defs
    with _LOCK:
        for op in ops:
            if defs.has(op, ""):
                defs.deregister_schema(op, SCHEMA_VERSION, "")


@contextlib.contextmanager
def ascend_schemas_registered() -> Iterator[None]:
    """The Ascend schemas are registered inside the block; on exit, the ones it registered are removed
    (needs onnx >= 1.16 for ``onnx.defs.deregister_schema``)."""
    registered = register_ascend_schemas()
    try:
        yield
    finally:
        unregister_ascend_schemas(registered)
