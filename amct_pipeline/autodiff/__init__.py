"""Differentiable execution of ONNX graphs in numpy (retrain simulation's engine).

``Program`` is a graph as the engine runs it (engine operators may be inserted: fake quantization);
``Executor`` runs a program, or the block between two tensor sets, forward and computes
vector-Jacobian products back to chosen parameters and inputs. ``quantops`` holds the fake-quant
operators with straight-through, ULQ, LSQ (``ulq_retrain``) and AdaRound gradients; ``optim``
Adam and the mean squared error.

Sits at the runtime level: imports numpy, onnx, ``ir``, ``quant``, ``options`` and ``errors`` only.
Importing it registers the ONNX operators in its own table and does nothing else.
"""
from . import conv, elementwise, linear, movement, resize  # noqa: F401  (operator registration)
from ._util import AutodiffError
from .executor import Executor
from .op import Op, supported_ops
from .optim import Adam, mse
from .program import Node, Program
from .quantops import ULQ, AdaRound, ARQRetrain, FakeQuant, LSQWeight, QDrop, ulq_factors, ulq_guard

__all__ = [
    "AutodiffError",
    "Executor",
    "Program",
    "Node",
    "Op",
    "supported_ops",
    "FakeQuant",
    "QDrop",
    "ULQ",
    "ARQRetrain",
    "LSQWeight",
    "AdaRound",
    "ulq_factors",
    "ulq_guard",
    "Adam",
    "mse",
]
