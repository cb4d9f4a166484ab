"""What the three built-in methods share: rank validation, candidate ranks, rounding, whitening."""
from __future__ import annotations

import math
from typing import ClassVar, Optional, Sequence

import numpy as np
from pydantic import Field

from ...options import Options
from ..base import DecompositionMethod
from .layer import ConvLayer, Rank
from .stats import whitening

__all__ = ["MethodOptions", "ConvDecomposition", "round_rank"]


class MethodOptions(Options):
    multiple_of: int = Field(1, ge=1, description="Round ranks chosen by a rule or a target to a multiple of this "
                                                  "(16 suits Ascend's cube unit); explicit ranks are used as given.")


def round_rank(value: int, multiple: int, limit: int) -> int:
    """Nearest multiple of ``multiple`` (at least one step), never above ``limit``."""
    if multiple <= 1:
        return int(min(max(value, 1), limit))
    rounded = max(multiple, int(round(value / multiple)) * multiple)
    return int(min(rounded, limit))


class ConvDecomposition(DecompositionMethod):
    """Base of the built-in methods; subclasses define the rank meaning, structure and math."""

    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    Options = MethodOptions

    # -- ranks -------------------------------------------------------------------------------
    def normalize_rank(self, layer: ConvLayer, rank: int | Sequence[int]) -> Rank:
        values = (rank,) if isinstance(rank, (int, np.integer)) else tuple(rank)
        count = len(self.rank_names)
        if len(values) == 1 and count > 1:
            values = values * count
        if len(values) != count:
            raise ValueError(f"{self.name} takes {count} rank value(s) ({', '.join(self.rank_names)}), "
                             f"got {list(values)}")
        for label, value, limit in zip(self.rank_names, values, self.max_rank(layer)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{label} must be a positive integer, got {value!r}")
            if value > limit:
                raise ValueError(f"{label} {value} is larger than layer '{layer.name}' allows: at most {limit} "
                                 f"({self.limit_reason(layer)})")
        return tuple(int(v) for v in values)

    def limit_reason(self, layer: ConvLayer) -> str:
        return "the rank of the reshaped weight"

    def candidate_ranks(self, layer: ConvLayer) -> list[Rank]:
        ranks = self.all_ranks(layer)
        multiple = self.options.multiple_of
        if multiple <= 1:
            return ranks
        limits = self.max_rank(layer)
        kept = [r for r in ranks if all(v % multiple == 0 or v == lim for v, lim in zip(r, limits))]
        return kept or ranks

    def all_ranks(self, layer: ConvLayer) -> list[Rank]:
        return [(r,) for r in range(1, self.max_rank(layer)[0] + 1)]

    def rounded(self, layer: ConvLayer, rank: Rank) -> Rank:
        return tuple(round_rank(v, self.options.multiple_of, lim) for v, lim in zip(rank, self.max_rank(layer)))

    # -- data-aware helper -------------------------------------------------------------------
    @staticmethod
    def whiten(input_cov: Optional[np.ndarray], dim: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """(C^{1/2}, C^{-1/2}) or (None, None) for data-free decomposition."""
        if input_cov is None:
            return None, None
        if input_cov.shape != (dim, dim):
            raise ValueError(f"input covariance is {input_cov.shape}, expected {(dim, dim)}")
        return whitening(input_cov)


def proportional_ranks(cin: int, cout: int) -> list[Rank]:
    """(r_in, r_out) pairs keeping r_in/Cin ≈ r_out/Cout, cheapest first."""
    largest = max(cin, cout)
    pairs = {(max(1, math.ceil(t * cin / largest)), max(1, math.ceil(t * cout / largest)))
             for t in range(1, largest + 1)}
    return sorted(pairs)


def thin_svd(matrix, n_eigenvecs=None, **_):
    """The SVD tensorly asks for, without the full square factor its default computes (5-50x faster)."""
    u, s, vt = np.linalg.svd(np.asarray(matrix), full_matrices=False)
    count = len(s) if n_eigenvecs is None else min(int(n_eigenvecs), len(s))
    return u[:, :count], s[:count], vt[:count]


__all__ += ["proportional_ranks", "thin_svd"]
