"""The Ascend operator schemas: ``schemas.check_model`` checks a deploy model as ``onnx.checker`` does
with the schemas registered, but leaves onnx's process-wide registry (and the model) as it was; the
opt-in registration removes what it registered."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from amct_pipeline.ascend import pack_deq_scale
from amct_pipeline.ascend.reference import ASCEND_OPS
from amct_pipeline.ascend.schemas import (ASCEND_OP_SPECS, ascend_op_schemas, ascend_schemas_registered,
                                          check_model, register_ascend_schemas, unregister_ascend_schemas)

ASCEND = tuple(ASCEND_OP_SPECS)


def registered() -> set[str]:
    return {op for op in ASCEND if onnx.defs.has(op, "")}


@pytest.fixture(autouse=True)
def clean_registry():
    assert not registered(), "a test before this one left Ascend schemas registered with onnx"
    yield
    assert not registered()


def deploy_model(domain: str = "", quant=None, dequant=None) -> onnx.ModelProto:
    """x -> AscendQuant -> Conv (int8) -> AscendDequant -> Relu -> AscendQuant -> AscendAntiQuant -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 128, (4, 3, 3, 3)).astype(np.int8), "w"),
             numpy_helper.from_array(rng.integers(-99, 99, 4).astype(np.int32), "b"),
             numpy_helper.from_array(pack_deq_scale(np.full(4, 1e-3, np.float32)), "deq")]
    quant = quant or dict(scale=10.0, offset=3.0, sqrt_mode=0, round_mode="Round", dst_type="INT8")
    dequant = dequant or dict(dtype=0)
    nodes = [helper.make_node("AscendQuant", ["x"], ["xq"], name="conv.quant", domain=domain, **quant),
             helper.make_node("Conv", ["xq", "w", "b"], ["acc"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("AscendDequant", ["acc", "deq"], ["c"], name="conv.dequant", domain=domain, **dequant),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("AscendQuant", ["r"], ["rq"], name="relu:0.quant", domain=domain, scale=4.0, offset=0.0),
             helper.make_node("AscendAntiQuant", ["rq"], ["y"], name="relu:0.anti_quant", domain=domain,
                              scale=0.25, offset=0.0, sqrt_mode=0, dtype=0)]
    graph = helper.make_graph(nodes, "deploy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], inits)
    opsets = [helper.make_opsetid("", 13)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return model


def test_check_model_leaves_registry_and_model_alone():
    model = deploy_model()
    before = model.SerializeToString()
    with pytest.raises(onnx.checker.ValidationError, match="No Op registered for AscendQuant"):
        onnx.checker.check_model(model)           # onnx does not know the Ascend operators...
    check_model(model)                            # ...check_model checks them without registering them
    assert model.SerializeToString() == before
    assert not registered()
    with ascend_schemas_registered():
        assert registered() == set(ASCEND)
        onnx.checker.check_model(model)
    assert not registered()


def test_custom_domain_and_plain_models():
    check_model(deploy_model("amct.customop"))    # a custom domain: onnx checks the rest only
    plain = deploy_model()
    del plain.graph.node[:]
    plain.graph.node.append(helper.make_node("Identity", ["x"], ["y"]))
    check_model(plain)


def _mutations():
    """(description, node index, edit, rejected): a node edit, and whether the registered schemas reject it."""
    def attr(node, name, value):
        node.attribute.append(helper.make_attribute(name, value))

    def drop(node, name):
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)

    def retype(node, name, value):
        drop(node, name)
        attr(node, name, value)

    return [
        ("unknown attribute", 0, lambda n: attr(n, "foo", 1), True),
        ("float flag", 0, lambda n: retype(n, "sqrt_mode", 0.0), True),
        ("int scale", 0, lambda n: retype(n, "scale", 10), True),
        ("string dtype", 2, lambda n: retype(n, "dtype", "float"), True),
        ("missing required scale", 0, lambda n: drop(n, "scale"), True),
        ("missing required offset", 5, lambda n: drop(n, "offset"), True),
        ("missing optional attributes", 0, lambda n: [drop(n, k) for k in ("sqrt_mode", "round_mode", "dst_type")],
         False),
        ("extra input", 0, lambda n: n.input.append("x"), True),
        ("missing input", 2, lambda n: n.input.pop(), True),
        ("empty input", 2, lambda n: n.input.__setitem__(1, ""), True),
        ("extra output", 4, lambda n: n.output.append("extra"), True),
        ("no output", 5, lambda n: n.output.pop(), True),
        ("relu_flag on AscendDequant", 2, lambda n: attr(n, "relu_flag", 1), False),
    ]


@pytest.mark.parametrize("what,index,edit,rejected", _mutations(), ids=[m[0] for m in _mutations()])
def test_check_model_agrees_with_registered_checker(what, index, edit, rejected):
    model = deploy_model()
    edit(model.graph.node[index])
    if what == "no output":         # y is no longer produced: the graph outputs rq instead
        model.graph.output[0].name = "rq"
    with ascend_schemas_registered():
        try:
            onnx.checker.check_model(model)
            expected = None
        except onnx.checker.ValidationError as exc:
            expected = str(exc)
    assert (expected is not None) == rejected, expected
    if expected is None:
        check_model(model)
    else:
        with pytest.raises(onnx.checker.ValidationError) as caught:
            check_model(model)
        assert model.graph.node[index].name in str(caught.value)


def test_non_ascend_problems_are_still_found():
    model = deploy_model()
    model.graph.node[3].attribute.append(helper.make_attribute("alpha", 1.0))  # Relu has no 'alpha'
    with pytest.raises(onnx.checker.ValidationError, match="Unrecognized attribute: alpha"):
        check_model(model)
    assert {n.domain for n in model.graph.node} == {""}   # restored after the failed check


def test_registration_is_opt_in_and_leaves_foreign_schemas():
    ours = register_ascend_schemas()
    try:
        assert sorted(ours) == sorted(ASCEND)
        assert register_ascend_schemas() == []              # idempotent
        with ascend_schemas_registered():                   # already there: the block removes nothing
            pass
        assert registered() == set(ASCEND)
        check_model(deploy_model())                         # works with the schemas registered, too
    finally:
        unregister_ascend_schemas(ours)


def test_specs_are_what_the_schemas_and_the_reference_use():
    for schema in ascend_op_schemas():
        spec = ASCEND_OP_SPECS[schema.name]
        assert (schema.domain, schema.since_version) == ("", 1)
        assert schema.min_input == schema.max_input == len(spec.inputs)
        assert {name for name, a in schema.attributes.items() if a.required} == spec.required
        assert set(schema.attributes) == spec.required | spec.optional
        required, optional, inputs = ASCEND_OPS[schema.name]
        assert (required, optional, inputs) == (spec.required, spec.optional, (len(spec.inputs),))
