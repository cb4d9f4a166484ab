"""spatial_svd: AMCT's two-conv decomposition (SPEC 7), a (k x 1) and a (1 x k) child.

``Cout >= Cin`` ("SCFK"): the matrix ``M[(i,h), (o,w)] = W[o,i,h,w]`` is factorised as ``U_r·(S V)_r``;
the first child (k x 1, Cin -> r) is ``U_r``, the last (1 x k, r -> Cout) the core ``S V``.
``Cout < Cin`` ("FCFK"): AMCT transposes W, so the first child is horizontal (1 x k) and the last
vertical (k x 1), with ``M[(i,w), (o,h)]``; here the singular values sit on the first child, as
AMCT's core does. Only square kernels are eligible, so the kernel-swapped modes (*SK) never occur.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import Field

from .common import ConvDecomposition, MethodOptions
from .evbmf import amct_rank, evbmf_rank
from .layer import ChildSpec, ConvLayer, Rank, horizontal, vertical

__all__ = ["SpatialSvd", "SpatialSvdOptions"]


class SpatialSvdOptions(MethodOptions):
    rank_rule: Literal["amct", "evbmf"] = Field(
        "amct", description="Rank when no override or target applies: 'amct' = EVBMF, clamped to "
                            "[L/7, L/6] (L/5..L/4 from 256 channels) and rounded to a multiple of 16 (AMCT); "
                            "'evbmf' = the plain EVBMF rank.")


class SpatialSvd(ConvDecomposition):
    name = "spatial_svd"
    summary = "AMCT's spatial SVD: (k x 1) then (1 x k) convs from the SVD of the reshaped kernel; EVBMF rank."
    Options = SpatialSvdOptions
    preferred_rules = "amct"

    @staticmethod
    def _first_channel(layer: ConvLayer) -> bool:
        """AMCT's "first channel" modes transpose W when Cout < Cin."""
        return layer.cout < layer.cin

    def mode(self, layer: ConvLayer) -> str:
        return ("FC" if self._first_channel(layer) else "SC") + "FK"

    def max_rank(self, layer: ConvLayer) -> Rank:
        kh, kw = layer.kernel
        if self._first_channel(layer):
            return (min(layer.cin * kw, layer.cout * kh),)
        return (min(layer.cin * kh, layer.cout * kw),)

    def limit_reason(self, layer: ConvLayer) -> str:
        return f"the {self.mode(layer)} matrix of a {layer.cout}x{layer.cin}x{layer.kernel[0]}x{layer.kernel[1]} " \
               "kernel has no higher rank"

    def structure(self, layer: ConvLayer, rank: Rank) -> list[ChildSpec]:
        if layer.kernel[0] != layer.kernel[1]:
            raise ValueError(f"spatial_svd needs a square kernel, '{layer.name}' has {layer.kernel}")
        (r,) = rank
        if self._first_channel(layer):
            return [horizontal(layer, "first", layer.cin, r),
                    vertical(layer, "last", r, layer.cout, bias=layer.has_bias)]
        return [vertical(layer, "first", layer.cin, r),
                horizontal(layer, "last", r, layer.cout, bias=layer.has_bias)]

    def matrix(self, layer: ConvLayer, weight: np.ndarray) -> np.ndarray:
        """Rows: the first child's input patch (channel, tap); columns: (output channel, other tap)."""
        w = np.asarray(weight, np.float64)
        if self._first_channel(layer):
            return w.transpose(1, 3, 0, 2).reshape(layer.cin * layer.kernel[1], layer.cout * layer.kernel[0])
        return w.transpose(1, 2, 0, 3).reshape(layer.cin * layer.kernel[0], layer.cout * layer.kernel[1])

    def default_rank(self, layer: ConvLayer, weight: np.ndarray) -> Rank:
        matrix = self.matrix(layer, weight)
        if self.options.rank_rule == "amct":
            s = np.linalg.svd(matrix, compute_uv=False)
            return (amct_rank(s, layer.cin, layer.cout, *layer.kernel),)
        return self.rounded(layer, (max(1, evbmf_rank(matrix)),))

    def decompose(self, layer: ConvLayer, weight: np.ndarray, rank: Rank, *,
                  input_cov: Optional[np.ndarray] = None) -> list[np.ndarray]:
        (r,) = rank
        matrix = self.matrix(layer, weight)
        root, inverse = self.whiten(input_cov, matrix.shape[0])
        u, s, vt = np.linalg.svd(matrix if root is None else root @ matrix, full_matrices=False)
        u, s, vt = u[:, :r], s[:r], vt[:r]
        if inverse is not None:
            u = inverse @ u                  # back from whitened input coordinates
        if self._first_channel(layer):       # AMCT's core (with the singular values) is the first child
            first, last = u * s, vt
        else:
            first, last = u, s[:, None] * vt
        return self._kernels(layer, first, last)

    def _kernels(self, layer: ConvLayer, first: np.ndarray, last: np.ndarray) -> list[np.ndarray]:
        """Factor matrices as conv weights; ``first`` is [(i, tap), r], ``last`` is [r, (o, tap)]."""
        r, (kh, kw) = first.shape[1], layer.kernel
        if self._first_channel(layer):
            w1 = first.T.reshape(r, layer.cin, 1, kw)
            w2 = last.reshape(r, layer.cout, kh).transpose(1, 0, 2)[..., None]
        else:
            w1 = first.T.reshape(r, layer.cin, kh, 1)
            w2 = last.reshape(r, layer.cout, kw).transpose(1, 0, 2)[:, :, None, :]
        return [np.ascontiguousarray(w1), np.ascontiguousarray(w2)]
