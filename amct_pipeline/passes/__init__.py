"""The pass interface and the built-in passes (the pass manager is ``pipeline.manager``)."""
from .base import Pass, PassContext, PassResult

__all__ = ["Pass", "PassContext", "PassResult"]
