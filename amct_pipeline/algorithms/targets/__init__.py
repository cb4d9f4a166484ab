"""Lowering targets (selected by ``lower{targets=[...]}``) and the machinery they share."""
from .common import LayerPlan, LoweringPlan, PlanTarget, build_plan, copy_graph, lowering_plan, quant_multiplier
from .fakequant import FakeQuantTarget
from .qdq import QdqTarget, extra_tensors

__all__ = [
    "BUILTIN_TARGETS",
    "PlanTarget",
    "LayerPlan",
    "LoweringPlan",
    "build_plan",
    "lowering_plan",
    "copy_graph",
    "quant_multiplier",
    "FakeQuantTarget",
    "QdqTarget",
    "extra_tensors",
]

BUILTIN_TARGETS = [FakeQuantTarget, QdqTarget]
