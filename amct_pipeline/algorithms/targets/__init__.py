"""Lowering targets (selected by ``lower{targets=[...]}``); the Ascend target lives in ``ascend/``."""
from .base import LoweringContext, PlanTarget
from .fakequant import FakeQuantTarget
from .qat import QatTarget
from .qdq import QdqTarget

__all__ = ["BUILTIN_TARGETS", "PlanTarget", "LoweringContext", "FakeQuantTarget", "QdqTarget", "QatTarget"]

BUILTIN_TARGETS = [FakeQuantTarget, QdqTarget, QatTarget]
