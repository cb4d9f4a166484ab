"""The pass interface, the pass manager and the built-in passes."""
from .base import Pass, PassContext, PassResult

__all__ = ["Pass", "PassContext", "PassResult"]
