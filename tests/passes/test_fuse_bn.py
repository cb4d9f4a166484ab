"""fuse_bn: folding math on every layer kind, refusals with reasons, options, real models."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.ir import load_graph
from amct_pipeline.ir.external import ExternalValues
from amct_pipeline.passes.base import PassContext
from amct_pipeline.passes.fuse_bn import FuseBatchNormPass
from amct_pipeline.pipeline.manager import OutputStage
from amct_pipeline.testing import models
from amct_pipeline.testing.numerics import max_rel_diff, run_model
from conftest import shared_path

FOLDABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]


def _bn_after_foldable(model: onnx.ModelProto) -> int:
    """BatchNormalization nodes fed directly by a Conv/ConvTranspose/Gemm/MatMul."""
    producer = {out: n.op_type for n in model.graph.node for out in n.output}
    return sum(1 for n in model.graph.node
               if n.op_type == "BatchNormalization" and producer.get(n.input[0]) in FOLDABLE)


def _feed(shape, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).normal(size=shape).astype(np.float32)}


def _assert_same_outputs(before: onnx.ModelProto, after: onnx.ModelProto, feeds, tol: float = 1e-5) -> list[float]:
    ref, out = run_model(before, feeds), run_model(after, feeds)
    diffs = [max_rel_diff(a, b) for a, b in zip(ref, out)]
    assert len(ref) == len(out) and max(diffs) <= tol, diffs
    return diffs


# -- folding on every supported layer ----------------------------------------------------------
FOLD_CASES = {
    "conv2d": (lambda: models.conv_bn(), (2, 4, 6, 6)),
    "conv1d": (lambda: models.conv_bn(dims=1), (2, 4, 6)),
    "conv3d_grouped_nobias": (lambda: models.conv_bn(dims=3, group=2, bias=False), (2, 4, 6, 6, 6)),
    "depthwise_constant_node_bn": (lambda: models.conv_bn(cin=6, cout=6, group=6, bn_as_constant_nodes=True,
                                                          tail="relu"), (2, 6, 6, 6)),
    "opset9": (lambda: models.conv_bn(opset=9, tail="relu"), (2, 4, 6, 6)),
    "opset18": (lambda: models.conv_bn(opset=18), (2, 4, 6, 6)),
    "convtranspose_grouped": (lambda: models.conv_transpose_bn(group=2), (2, 4, 5, 5)),
    "convtranspose_nobias": (lambda: models.conv_transpose_bn(group=1, bias=False), (2, 4, 5, 5)),
    "gemm": (lambda: models.gemm_bn(), (3, 8)),
    "gemm_transB_alpha_beta_matrix_bias": (lambda: models.gemm_bn(trans_b=1, alpha=0.7, beta=1.3, bias="matrix"),
                                           (3, 8)),
    "gemm_no_bias": (lambda: models.gemm_bn(bias="none", alpha=2.0), (3, 8)),
    "matmul": (lambda: models.matmul_bn(), (3, 8)),
    "matmul_add_bias": (lambda: models.matmul_bn(bias_add=True), (3, 8)),
    "conv_constant_node_weight_add_bias": (models.conv_add_bn, (2, 3, 5, 5)),
}


@pytest.mark.parametrize("case", list(FOLD_CASES))
def test_fold_removes_bn_and_keeps_numerics(session, case):
    build, shape = FOLD_CASES[case]
    model = build()
    result = session.build("fuse_bn").run(model, verify_each="full")
    stats = result.stats_for("fuse_bn")
    assert stats["fused"] == 1 and stats["refused"] == {}
    assert "BatchNormalization" not in _ops(result.model)
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    _assert_same_outputs(model, result.model, _feed(shape))


def test_weights_really_change(session):
    """Guards against a vacuous pass: the folded weight differs from the original by γ/√(var+ε)."""
    model = models.conv_bn()
    result = session.build("fuse_bn").run(model)
    before = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    gamma, var = before["bn.scale"].astype(np.float64), before["bn.var"].astype(np.float64)
    expected = before["conv.weight"] * (gamma / np.sqrt(var + 1e-3)).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(after["conv.weight"], expected, rtol=1e-6)
    assert set(after) == {"conv.weight", "conv.bias"}    # names kept; BN stats gone


def test_matmul_gets_bias_add(session):
    result = session.build("fuse_bn").run(models.matmul_bn())
    assert _ops(result.model) == ["MatMul", "Add"]
    add = result.model.graph.node[1]
    assert add.output[0] == "y"


def test_constant_node_weight_gets_a_new_unique_initializer(session):
    result = session.build("fuse_bn").run(models.conv_add_bn())
    assert _ops(result.model) == ["Conv", "Add"]
    assert result.model.graph.node[0].input[1] == "wc_fused"


def test_gemm_beta_becomes_one(session):
    result = session.build("fuse_bn").run(models.gemm_bn(alpha=0.7, beta=1.3))
    gemm = result.model.graph.node[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in gemm.attribute}
    assert attrs["beta"] == pytest.approx(1.0) and attrs["alpha"] == pytest.approx(0.7)


def test_bn_output_that_is_graph_output_keeps_its_name(session):
    model = models.conv_bn(tail="both")      # BN output 'y' is a graph output and feeds a Relu
    result = session.build("fuse_bn").run(model)
    assert _ops(result.model) == ["Conv", "Relu"]
    assert result.model.graph.node[0].output[0] == "y"
    assert [o.name for o in result.model.graph.output] == ["y", "z"]
    _assert_same_outputs(model, result.model, _feed((2, 4, 6, 6)))


def test_bn_mul_and_bn_add_fold_into_bn_then_conv(session):
    model = models.conv_bn_mul_add()
    result = session.build("fuse_bn").run(model)
    stats = result.stats_for("fuse_bn")
    assert (stats["bn_mul_fused"], stats["bn_add_fused"], stats["fused"]) == (1, 1, 1)
    assert _ops(result.model) == ["Conv", "Relu"]
    _assert_same_outputs(model, result.model, _feed((2, 3, 5, 5)))


def _context(session) -> PassContext:
    return PassContext(session, datasets={}, outputs=OutputStage(None))


def test_copy_on_write_never_edits_initializer_arrays(session):
    graph = load_graph(models.conv_bn())
    old = graph.tensors()["conv.weight"]
    snapshot = old.values.copy()
    result = FuseBatchNormPass().run(graph, _context(session))
    new = graph.tensors()["conv.weight"]
    assert result.modified and new is not old
    np.testing.assert_array_equal(old.values, snapshot)
    assert not np.array_equal(new.values, snapshot)


# -- refusals -----------------------------------------------------------------------------------
REFUSALS = {
    "shared_weight": (models.shared_weight_conv_bn, "bn1", "weight 'w1' shared by 2 nodes"),
    "shared_bias": (models.shared_bias_conv_bn, "bn1", "bias 'b1' shared by 2 nodes"),
    "nonconst_weight": (models.nonconst_weight_conv_bn, "bn", "weight of 'conv' is not constant"),
    "conv_output_reused": (models.conv_output_reused_bn, "bn", "read by 2 nodes"),
    "training_mode": (models.bn_training_mode, "bn", "training mode"),
    "extra_output_used": (models.bn_extra_output_used, "bn", "extra outputs"),
    "not_after_layer": (models.relu_bn, "bn", "follows Relu 'relu'"),
    "matmul_3d": (lambda: models.matmul_bn(rank=3), "bn", "3-D"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals_are_counted_with_a_reason(session, case):
    build, bn_name, reason = REFUSALS[case]
    model = build()
    result = session.build("fuse_bn").run(model)
    stats = result.stats_for("fuse_bn")
    assert stats["fused"] == 0
    assert reason in stats["refused"][bn_name]
    assert _ops(result.model).count("BatchNormalization") == _ops(model).count("BatchNormalization")


def test_skip_fusion_layers_by_layer_or_bn_name(session):
    for name in ("conv", "bn"):
        result = session.build(f"fuse_bn{{skip_fusion_layers=[{name}]}}").run(models.conv_bn())
        stats = result.stats_for("fuse_bn")
        assert stats["fused"] == 0 and "skip_fusion_layers" in stats["refused"]["bn"]
        assert "BatchNormalization" in _ops(result.model)


def test_skip_one_of_two(session):
    result = session.build("fuse_bn{skip_fusion_layers=[conv2]}").run(models.shared_bias_conv_bn())
    assert "skip_fusion_layers" in result.stats_for("fuse_bn")["refused"]["bn2"]


def test_do_fusion_false_is_a_no_op(session):
    model = models.conv_bn()
    result = session.build("fuse_bn{do_fusion=false}").run(model)
    assert result.stats_for("fuse_bn")["fused"] == 0
    assert _ops(result.model) == ["Conv", "BatchNormalization"]


def test_unknown_skip_layer_is_an_error_with_suggestion(session):
    with pytest.raises(PassError) as info:
        session.build("fuse_bn{skip_fusion_layers=[convv]}").run(models.conv_bn())
    cause = info.value.__cause__
    assert isinstance(cause, ConfigError)
    assert "no layer named 'convv'" in str(cause) and "did you mean 'conv'" in str(cause)
    assert "\n" not in str(cause)


def test_skip_layer_of_wrong_type_is_an_error(session):
    graph = load_graph(models.conv_bn(tail="relu"))
    with pytest.raises(ConfigError, match="'relu' is a Relu, not a fusable layer"):
        FuseBatchNormPass({"skip_fusion_layers": ["relu"]}).run(graph, _context(session))


def test_unknown_option_is_rejected_at_build(session):
    with pytest.raises(ConfigError, match="do_fusion"):
        session.build("fuse_bn{do_fuse=false}")


# -- external data and memory -------------------------------------------------------------------
def _external_model(tmp_path: Path, big_rows: int = 1 << 12) -> Path:
    """Conv+BN (small) plus a Gemm whose 16 MB weight is external and must stay on disk."""
    model = models.conv_bn(cin=3, cout=4, size=4)
    rng = np.random.default_rng(0)
    features = 4 * 4 * 4
    big = rng.normal(size=(features, big_rows)).astype(np.float32)
    graph = model.graph
    graph.initializer.append(numpy_helper.from_array(big, "big.weight"))
    graph.node.extend([
        helper.make_node("Flatten", ["y"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "big.weight"], ["logits"], name="big"),
    ])
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, [2, big_rows]))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=1 << 20)
    return path


def test_unfolded_external_weights_are_never_loaded(session, tmp_path):
    path = _external_model(tmp_path)
    graph = load_graph(path)
    tracemalloc.start()
    try:
        result = FuseBatchNormPass().run(graph, _context(session))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.stats["fused"] == 1
    assert isinstance(graph.tensors()["big.weight"]._values, ExternalValues)
    assert peak < 4 << 20, f"peak {peak / 2**20:.1f} MB: the 16 MB weight was loaded"


# -- real models --------------------------------------------------------------------------------
def _real_feeds(name: str) -> list[dict[str, np.ndarray]]:
    if name.startswith("ultraface"):
        x = np.load(shared_path("data/faces24_240x320_f32.npz"))["x"]
        return [{"input": x[i:i + 1]} for i in (0, 7, 15)]
    if name.startswith("resnet8"):
        x = np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"]
        return [{"input": x[:8].astype(np.float32)}]
    x = np.load(shared_path("data/digits_test_split.npz"))["x"].astype(np.float32)
    return [{"input": x[i:i + 1]} for i in range(0, 40, 8)]


REAL_MODELS = ["ultraface_rfb320_bn", "resnet8_cifar10_bn", "digits_cnn_bn", "digits_cnn_bn_opset18"]


@pytest.mark.parametrize("name", REAL_MODELS)
def test_real_model_all_bn_folded_and_outputs_match(session, tmp_path, name):
    path = shared_path(f"models/{name}.onnx")
    feeds = _real_feeds(name)
    original = onnx.load(str(path), load_external_data=False)
    assert _bn_after_foldable(original) > 0
    result = session.build("fuse_bn,save").run(path, output_dir=tmp_path)
    saved = tmp_path / f"{name}.onnx"
    folded = onnx.load(str(saved))
    assert _bn_after_foldable(folded) == 0
    assert _ops(folded).count("BatchNormalization") == 0
    assert result.stats_for("fuse_bn")["fused"] == _ops(original).count("BatchNormalization")
    worst = 0.0
    for feed in feeds:
        ref, out = run_model(path, feed), run_model(saved, feed)
        worst = max([worst] + [max_rel_diff(a, b) for a, b in zip(ref, out)])
    assert worst <= 1e-4, f"{name}: max relative difference {worst:.2e}"
