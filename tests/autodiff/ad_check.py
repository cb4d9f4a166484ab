"""One-node ONNX models, the onnxruntime forward reference and finite-difference gradient checks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from amct_pipeline.autodiff import Executor
from amct_pipeline.runtime.ort import make_session

FD_EPS = 1e-6
FD_MAX_ELEMENTS = 400        # per-element central differences up to this size, random directions beyond


@dataclass
class Case:
    """``op`` on named inputs. Roles: ``in`` (graph input, gradient checked), ``param`` (initializer
    trained as an Executor parameter, gradient checked), ``const`` (initializer, no gradient)."""

    id: str
    op: str
    inputs: list[tuple[str, np.ndarray, str]]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    outputs: list[tuple[str, int]] = field(default_factory=lambda: [("y", onnx.TensorProto.FLOAT)])
    grad: bool = True            # False: forward check only (no gradient, e.g. shape helpers)
    ort: bool = True             # False: onnxruntime lacks the operator / variant
    rtol: float = 2e-5           # forward tolerance vs onnxruntime, relative to max |reference|

    def model(self) -> onnx.ModelProto:
        graph_inputs, inits, names = [], [], []
        for name, value, role in self.inputs:
            names.append(name)
            if not name:
                continue
            if role == "in":
                elem = helper.np_dtype_to_tensor_dtype(np.dtype(np.float32) if value.dtype.kind == "f" else value.dtype)
                graph_inputs.append(helper.make_tensor_value_info(name, elem, list(value.shape)))
            else:
                arr = value.astype(np.float32) if value.dtype == np.float64 else value
                inits.append(numpy_helper.from_array(arr, name))
        node = helper.make_node(self.op, names, [n for n, _ in self.outputs], name="node", **self.attrs)
        outputs = [helper.make_tensor_value_info(n, t, None) for n, t in self.outputs]
        graph = helper.make_graph([node], self.id, graph_inputs, outputs, inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = 8
        return model

    def feeds(self, dtype) -> dict[str, np.ndarray]:
        return {n: (v.astype(dtype) if v.dtype.kind == "f" else v) for n, v, role in self.inputs if role == "in" and n}

    def diff_names(self, role: str) -> list[str]:
        return [n for n, v, r in self.inputs if r == role and n and v.dtype.kind == "f"]


def check_forward(case: Case) -> float:
    """Max error of the engine (float32) against onnxruntime, relative to the reference's max."""
    model = case.model()
    feeds = case.feeds(np.float32)
    ref = make_session(model, optimize=False).run(None, feeds)
    got = Executor(model).run(feeds)
    worst = 0.0
    for r, g in zip(ref, got):
        assert r.shape == g.shape, (case.id, r.shape, g.shape)
        if r.dtype.kind in "iub":
            assert np.array_equal(r, g), case.id
            continue
        scale = max(float(np.abs(r).max()), 1e-6) if r.size else 1.0
        worst = max(worst, float(np.abs(r.astype(np.float64) - g).max()) / scale if r.size else 0.0)
    assert worst <= case.rtol, f"{case.id}: forward error {worst:.3g} vs onnxruntime"
    return worst


def check_gradients(case: Case, rtol: float = 1e-5, atol: float = 1e-7, seed: int = 0) -> float:
    """Engine VJPs (float64) against central differences of ``sum(r * y)``; returns the worst error."""
    model = case.model()
    ins, params = case.diff_names("in"), case.diff_names("param")
    exe = Executor(model, params=params, grad_inputs=ins, dtype=np.float64)
    feeds = case.feeds(np.float64)
    exact = {n: v.astype(np.float64) for n, v, _ in case.inputs if n}
    rng = np.random.default_rng(seed)
    out = exe.forward(feeds)
    cot = {n: rng.standard_normal(np.shape(v)) for n, v in out.items()
           if np.asarray(v).dtype.kind == "f" and exe.requires_grad(n)}
    grads = exe.backward(cot)

    def loss(name, value) -> float:
        if name in params:
            exe.params[name] = value
            result = exe.forward(feeds, grad=False)
            exe.params[name] = exact[name]
        else:
            result = exe.forward({**feeds, name: value}, grad=False)
        return float(sum(np.sum(cot[k] * result[k]) for k in cot))

    worst = 0.0
    for name in ins + params:
        base = exact[name]
        g = grads[name]
        assert g.shape == base.shape, (case.id, name, g.shape, base.shape)
        if base.size <= FD_MAX_ELEMENTS:
            numeric = np.zeros_like(base)
            for i in range(base.size):
                plus, minus = base.copy(), base.copy()
                plus.flat[i] += FD_EPS
                minus.flat[i] -= FD_EPS
                numeric.flat[i] = (loss(name, plus) - loss(name, minus)) / (2 * FD_EPS)
            err = np.abs(numeric - g) - (atol + rtol * np.abs(numeric))
            worst = max(worst, float(np.abs(numeric - g).max()))
            assert (err <= 0).all(), f"{case.id}: d/d{name} max error {np.abs(numeric - g).max():.3g}"
        else:
            for _ in range(3):
                v = rng.standard_normal(base.shape)
                numeric = (loss(name, base + FD_EPS * v) - loss(name, base - FD_EPS * v)) / (2 * FD_EPS)
                analytic = float(np.sum(g * v))
                worst = max(worst, abs(numeric - analytic))
                assert abs(numeric - analytic) <= atol * base.size + rtol * abs(numeric), (
                    f"{case.id}: d/d{name} directional error {abs(numeric - analytic):.3g}")
    return worst
