"""cp: 1x1 (Cin -> R), (k x 1) depthwise, (1 x k) depthwise, 1x1 (R -> Cout) — Lebedev et al. 2015.

CP (PARAFAC, tensorly ALS) of the 4-way kernel: ``W[o,i,h,w] ≈ Σ_r λ_r A_o[o,r] A_i[i,r] A_h[h,r] A_w[w,r]``.
The depthwise children carry the stride/padding of their axis. Data-aware: decompose ``W ×₁ C^{1/2}``
and un-whiten the input factor, as for Tucker-2.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import Field

from .common import ConvDecomposition, MethodOptions, thin_svd
from .evbmf import mode_ranks
from .layer import ChildSpec, ConvLayer, Rank, horizontal, pointwise, vertical

__all__ = ["Cp", "CpOptions"]


class CpOptions(MethodOptions):
    rank_rule: Literal["vbmf"] = Field(
        "vbmf", description="Rank when no override or target applies: the larger VBMF rank of the channel "
                            "unfoldings (a heuristic: CP has no closed-form rank rule; prefer a target).")
    n_iter_max: int = Field(100, ge=1, le=10_000, description="ALS iterations of tensorly's parafac.")
    seed: int = Field(0, description="random_state given to tensorly (ALS initialisation beyond the SVD).")


class Cp(ConvDecomposition):
    name = "cp"
    summary = "CP / PARAFAC (tensorly): 1x1, (k x 1) depthwise, (1 x k) depthwise, 1x1 convs."
    Options = CpOptions

    def mode(self, layer: ConvLayer) -> str:
        return "CP"

    def max_rank(self, layer: ConvLayer) -> Rank:
        """Any tensor is a sum of (product of all dims but the largest) rank-one terms."""
        dims = sorted((layer.cout, layer.cin, *layer.kernel))
        return (int(np.prod(dims[:-1])),)

    def limit_reason(self, layer: ConvLayer) -> str:
        return "a CP rank above the product of all kernel dimensions but the largest is never needed"

    def structure(self, layer: ConvLayer, rank: Rank) -> list[ChildSpec]:
        (r,) = rank
        return [pointwise("first", layer.cin, r), vertical(layer, "vertical", r, r, group=r),
                horizontal(layer, "horizontal", r, r, group=r), pointwise("last", r, layer.cout, bias=layer.has_bias)]

    def default_rank(self, layer: ConvLayer, weight: np.ndarray) -> Rank:
        return self.rounded(layer, (max(mode_ranks(weight, (0, 1))),))

    def decompose(self, layer: ConvLayer, weight: np.ndarray, rank: Rank, *,
                  input_cov: Optional[np.ndarray] = None) -> list[np.ndarray]:
        from tensorly.decomposition import parafac      # heavy: loaded only when decomposing
        (r,) = rank
        w = np.asarray(weight, np.float64)
        root, inverse = self.whiten(input_cov, layer.cin)
        target = w if root is None else np.einsum("oihw,ij->ojhw", w, root)
        cp = parafac(target, r, init="svd", svd=thin_svd, n_iter_max=self.options.n_iter_max, normalize_factors=True,
                     random_state=self.options.seed)
        lam, (a_out, a_in, a_h, a_w) = np.asarray(cp.weights), [np.asarray(f) for f in cp.factors]
        first = a_in.T if inverse is None else a_in.T @ inverse
        # the spatial factors are unit-norm; λ goes to the last 1x1 so no child gets a huge scale
        return [first[:, :, None, None], a_h.T[:, None, :, None], a_w.T[:, None, None, :],
                (a_out * lam)[:, :, None, None]]
