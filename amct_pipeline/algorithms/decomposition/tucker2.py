"""tucker2: 1x1 (Cin -> r_in), k x k core (r_in -> r_out, the layer's stride/padding), 1x1 (r_out -> Cout).

Partial Tucker (HOOI, tensorly) over the output and input channel modes of the kernel:
``W ≈ G ×₀ U_out ×₁ U_in``. Ranks by VBMF on the two mode unfoldings (Kim et al. 2016) or by a
target. Data-aware: decompose ``W ×₁ C^{1/2}`` (C = input channel covariance), then the first
child is ``U_inᵀ C^{-1/2}`` — it keeps the input directions the layer's response needs.
"""
from __future__ import annotations

from typing import Literal, Optional

import numpy as np
from pydantic import Field

from .common import ConvDecomposition, MethodOptions, proportional_ranks, thin_svd
from .evbmf import mode_ranks
from .layer import ChildSpec, ConvLayer, Rank, pointwise

__all__ = ["Tucker2", "Tucker2Options"]


class Tucker2Options(MethodOptions):
    rank_rule: Literal["vbmf"] = Field("vbmf", description="Ranks when no override or target applies: EVBMF "
                                                           "rank of the output- and input-channel unfoldings.")
    n_iter_max: int = Field(50, ge=0, le=10_000, description="HOOI iterations of tensorly's partial_tucker (0 = HOSVD).")
    seed: int = Field(0, description="random_state given to tensorly.")


class Tucker2(ConvDecomposition):
    name = "tucker2"
    summary = "Tucker-2 (tensorly partial Tucker): 1x1, k x k core, 1x1 convs; ranks by VBMF or a target."
    Options = Tucker2Options
    rank_names = ("rank_in", "rank_out")

    def mode(self, layer: ConvLayer) -> str:
        return "TUCKER2"

    def max_rank(self, layer: ConvLayer) -> Rank:
        return (layer.cin, layer.cout)

    def limit_reason(self, layer: ConvLayer) -> str:
        return f"rank_in <= {layer.cin} input channels, rank_out <= {layer.cout} output channels"

    def all_ranks(self, layer: ConvLayer) -> list[Rank]:
        return proportional_ranks(layer.cin, layer.cout)

    def structure(self, layer: ConvLayer, rank: Rank) -> list[ChildSpec]:
        r_in, r_out = rank
        core = ChildSpec("core", r_in, r_out, layer.kernel, layer.stride, layer.pads, 1, False, layer.dilation)
        return [pointwise("first", layer.cin, r_in), core, pointwise("last", r_out, layer.cout, bias=layer.has_bias)]

    def default_rank(self, layer: ConvLayer, weight: np.ndarray) -> Rank:
        r_out, r_in = mode_ranks(weight, (0, 1))
        return self.rounded(layer, (r_in, r_out))

    def decompose(self, layer: ConvLayer, weight: np.ndarray, rank: Rank, *,
                  input_cov: Optional[np.ndarray] = None) -> list[np.ndarray]:
        from tensorly.decomposition import partial_tucker      # heavy: loaded only when decomposing
        r_in, r_out = rank
        w = np.asarray(weight, np.float64)
        root, inverse = self.whiten(input_cov, layer.cin)
        target = w if root is None else np.einsum("oihw,ij->ojhw", w, root)
        (core, (u_out, u_in)), _ = partial_tucker(target, rank=[r_out, r_in], modes=[0, 1], init="svd", svd=thin_svd,
                                                  n_iter_max=self.options.n_iter_max,
                                                  random_state=self.options.seed)
        first = u_in.T if inverse is None else u_in.T @ inverse
        return [first[:, :, None, None], np.asarray(core), np.asarray(u_out)[:, :, None, None]]
