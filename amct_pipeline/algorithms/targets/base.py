"""What every plan-driven lowering target shares: upgrade the opset, rewrite a copy of the float graph
from the plan, quantize the plan's tensors, clean up and export.

The graph handed to a target is always a copy (``ir.edit.copy_graph``) whose weights are shared with
the float graph, so targets replace constants instead of editing arrays in place (copy on write).
"""
from __future__ import annotations

import abc
from typing import ClassVar

import onnx
import onnx_graphsurgeon as gs

from ...ir.edit import Namer, ensure_opset
from ...quant.fakequant import constant_factors, emit_antiquant, emit_fake_quant
from ...quant.plan import QUANT_OPSET, LoweringPlan
from ..base import LoweringContext, LoweringTarget

__all__ = ["PlanTarget", "LoweringContext"]


class PlanTarget(LoweringTarget):
    """A lowering target driven by the plan. Subclasses set ``suffix`` and implement ``rewrite``.

    ``suffix``: the file is ``<prefix>_<suffix>.onnx``. ``min_opset``: the default-domain opset the
    output needs (the graph is upgraded with onnx.version_converter when lower; None = never).
    """

    suffix: ClassVar[str]
    min_opset: ClassVar[int | None] = QUANT_OPSET

    def check_plan(self, plan: LoweringPlan) -> None:
        """Refuse, with a ConfigError naming the layer and the target, a precision this target cannot
        hold. ``lower`` calls it for every target before any is lowered or written. Default: anything."""

    def opset(self, plan: LoweringPlan) -> int | None:
        """The default-domain opset the output needs for ``plan`` (``min_opset`` unless a precision needs more)."""
        return self.min_opset

    def lower(self, graph, ctx: LoweringContext) -> onnx.ModelProto:
        version = self.opset(ctx.plan)
        if version is not None:
            ensure_opset(graph, version, where="pass 'lower'", path=f"target '{self.name}'",
                         hint=f"upgrade the model to opset {version} or later before quantizing")
        self.rewrite(graph, ctx.plan, ctx)
        if ctx.plan.tensors:
            self.rewrite_tensors(graph, ctx.plan, ctx)
        graph.finalize()
        return graph.to_proto()

    @abc.abstractmethod
    def rewrite(self, graph, plan: LoweringPlan, ctx: LoweringContext) -> None:
        """Edit ``graph`` (a copy of the float graph) in place."""

    def rewrite_tensors(self, graph, plan: LoweringPlan, ctx: LoweringContext) -> None:
        """Tensor quantization entries (run after ``rewrite``). Default: AMCT's fake-quant form before
        the node's input, i.e. exactly what AscendQuant + AscendAntiQuant compute."""
        namer = Namer(graph)
        nodes = {node.name: node for node in graph.nodes}
        done: dict[tuple, gs.Tensor] = {}
        for entry in plan.tensors.values():
            node = nodes[entry.node]
            if entry.input_key not in done:
                prefix = f"{entry.key}.quant.fakequant"
                codes = emit_fake_quant(graph, namer, node.inputs[entry.index], prefix,
                                        constant_factors(namer, prefix, entry.act))
                done[entry.input_key] = emit_antiquant(graph, namer, codes, f"{entry.key}.fakeantiquant",
                                                       entry.act.scale)
            node.inputs[entry.index] = done[entry.input_key]
