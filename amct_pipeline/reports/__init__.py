"""Reports passes print or write: tables for the terminal, JSON, optional PNG plots (matplotlib, lazily)."""
from .decomposition import DecompositionReport, LayerReport, format_table

__all__ = ["DecompositionReport", "LayerReport", "format_table"]
