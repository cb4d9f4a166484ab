"""An example plugin: the pass ``strip_identity`` and the calibrator ``absmax``.

Everything a plugin needs comes from amct_pipeline's public API, the package top level:
``hookimpl``, ``Pass``, ``PassResult``, ``Options`` and the algorithm bases with their result types
(here ``ActivationCalibrator`` and ``ActQuantParams``). Nothing is imported from inside the package.
"""
from __future__ import annotations

import numpy as np
from pydantic import Field

from amct_pipeline import ActivationCalibrator, ActQuantParams, Options, Pass, PassResult, hookimpl


class StripIdentityOptions(Options):
    keep_outputs: bool = Field(True, description="Keep Identity nodes that produce a graph output.")


class StripIdentityPass(Pass):
    name = "strip_identity"
    summary = "Remove Identity nodes, wiring their consumers to the Identity's input."
    Options = StripIdentityOptions

    def run(self, graph, ctx) -> PassResult:
        removed = 0
        for node in list(graph.nodes):
            if node.op != "Identity":
                continue
            source, target = node.inputs[0], node.outputs[0]
            if graph.is_graph_output(target):
                continue   # the graph's output names are part of its interface
            for consumer in graph.consumers(target):
                consumer.inputs = [source if t is target else t for t in consumer.inputs]
            node.outputs.clear()
            removed += 1
        if removed:
            graph.finalize()
        return PassResult(removed > 0, {"removed": removed})


class AbsMaxOptions(Options):
    margin: float = Field(1.0, gt=0, le=2, description="Multiply the observed max |x| by this factor.")
    num_bits: int = Field(8, description="Activation bits.")


class AbsMaxCalibrator(ActivationCalibrator):
    name = "absmax"
    summary = "Symmetric scale from the running max |x| times a margin (example plugin)."
    Options = AbsMaxOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self._absmax: dict[str, float] = {}

    def observe(self, tensor_name: str, batch: np.ndarray) -> None:
        peak = float(np.max(np.abs(batch))) if batch.size else 0.0
        self._absmax[tensor_name] = max(self._absmax.get(tensor_name, 0.0), peak)

    def finalize(self) -> dict[str, ActQuantParams]:
        levels = (1 << (self.options.num_bits - 1)) - 1
        return {name: ActQuantParams(scale=max(peak * self.options.margin, 1e-8) / levels, offset=0,
                                     num_bits=self.options.num_bits)
                for name, peak in self._absmax.items()}


@hookimpl
def amct_register_passes():
    return [StripIdentityPass]


@hookimpl
def amct_register_calibrators():
    return [AbsMaxCalibrator]
