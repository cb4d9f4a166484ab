"""Helpers for tests (ours and plugin authors'): tiny model builders and numeric comparisons.

Nothing here is imported by the library itself; onnxruntime is imported only when a model runs.
"""
__all__ = ["models", "numerics"]
