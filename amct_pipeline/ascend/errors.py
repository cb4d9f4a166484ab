"""Errors of the Ascend operator reference."""
from __future__ import annotations

from ..errors import AmctError

__all__ = ["AscendError"]


class AscendError(AmctError, ValueError):
    """A bad Ascend operator parameter, attribute or deploy-model node; always a one-line message.

    It is a ``ValueError`` too, so callers that only know the numpy kernels can catch that.
    """
