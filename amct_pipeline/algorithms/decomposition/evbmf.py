"""Rank rules: EVBMF (Nakajima et al., empirical variational Bayes matrix factorisation) and AMCT's clamp.

SPEC 7: for an L x M matrix (L <= M) with singular values s, α = L/M, τ̄ = 2.5129·√α; the noise
variance σ² minimises the EVBMF free energy between two bounds; rank₀ = #{s > √(M·σ²·(1+τ̄)(1+α/τ̄))}.
AMCT then clamps rank₀ into [⌊L/(d+1)⌋, ⌊L/d⌋] (d = 6, or 4 when min(Cin, Cout) >= 256) and rounds
to a multiple of 16.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["evbmf_rank", "evbmf_noise_variance", "amct_clamp", "round_to_16", "amct_rank", "mode_ranks"]

TAU_CONSTANT = 2.5129      # τ̄ = 2.5129·√α, the EVBMF threshold constant
XATOL = 1e-5               # AMCT's bounded-search tolerance ...
MAX_ITER = 500             # ... and iteration cap


def _free_energy(sigma2: float, s2: np.ndarray, L: int, M: int, residual: float) -> float:
    """EVBMF objective of the noise variance (up to constants); ``s2`` are squared singular values."""
    alpha = L / M
    tau_bar = TAU_CONSTANT * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    x = np.maximum(s2 / (M * sigma2), 1e-300)       # a zero singular value must not give log(0)
    big, small = x[x > x_bar], x[x <= x_bar]
    tau = 0.5 * (big - (1 + alpha) + np.sqrt((big - (1 + alpha)) ** 2 - 4 * alpha))
    energy = np.sum(small - np.log(small)) + np.sum(big - tau)
    energy += np.sum(np.log((tau + 1) / big)) + alpha * np.sum(np.log(tau / alpha + 1))
    return float(energy + residual / (M * sigma2) + (L - len(s2)) * math.log(sigma2))


def evbmf_noise_variance(s: np.ndarray, L: int, M: int, residual: float = 0.0) -> float:
    """σ² minimising the free energy between the EVBMF bounds (bounded Brent search).

    The search runs on σ²/upper so that AMCT's absolute tolerance (1e-5) means the same thing
    whatever the weights' scale is.
    """
    from scipy.optimize import minimize_scalar      # scipy comes with tensorly; loaded only here
    s2 = np.sort(np.asarray(s, np.float64) ** 2)[::-1][:L]
    alpha = L / M
    tau_bar = TAU_CONSTANT * math.sqrt(alpha)
    x_bar = (1 + tau_bar) * (1 + alpha / tau_bar)
    upper = (float(s2.sum()) + residual) / (L * M)
    cut = int(min(math.ceil(L / (1 + alpha)) - 1, len(s2))) - 1
    tail = s2[cut + 1:] if cut + 1 < len(s2) else s2[-1:]
    lower = max(float(tail[0]) / (M * x_bar), float(np.mean(tail)) / M)
    if upper <= 0:
        return 0.0
    lower = min(max(lower, upper * 1e-12), upper)
    found = minimize_scalar(lambda t: _free_energy(t * upper, s2, L, M, residual), bounds=(lower / upper, 1.0),
                            method="bounded", options={"xatol": XATOL, "maxiter": MAX_ITER})
    return float(found.x) * upper


def evbmf_rank(matrix_or_singular_values: np.ndarray, shape: tuple[int, int] | None = None) -> int:
    """EVBMF rank of a matrix (or of singular values ``s`` of a matrix of ``shape``)."""
    values = np.asarray(matrix_or_singular_values, np.float64)
    if values.ndim == 2:
        shape = values.shape
        values = np.linalg.svd(values, compute_uv=False)
    L, M = sorted(shape)
    s = np.sort(values)[::-1][:L]
    if not np.any(s > 0):
        return 0
    sigma2 = evbmf_noise_variance(s, L, M)
    alpha = L / M
    tau_bar = TAU_CONSTANT * math.sqrt(alpha)
    threshold = math.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))
    return int(np.sum(s > threshold))


def amct_clamp(rank0: int, L: int, min_channels: int) -> int:
    """AMCT's clip of the EVBMF rank into [⌊L/(d+1)⌋, ⌊L/d⌋]."""
    d = 4 if min_channels >= 256 else 6
    return int(min(max(rank0, L // (d + 1)), L // d))


def round_to_16(rank: int) -> int:
    """Down to a multiple of 16 (at least 16); 16 more when that lost over 10 % of the rank.

    SPEC 7 gives the rule as "round to a multiple of 16 (>= 16; if result < 0.9·rank add 16)";
    rounding down first is our reading of it.
    """
    rounded = max(16, (rank // 16) * 16)
    return rounded + 16 if rounded < 0.9 * rank else rounded


def amct_rank(singular_values: np.ndarray, cin: int, cout: int, kh: int, kw: int) -> int:
    """AMCT's spatial-SVD rank: EVBMF, clamp, multiple of 16, never above L."""
    L = min(kh, kw) * min(cin, cout)
    M = max(kh, kw) * max(cin, cout)
    rank0 = evbmf_rank(singular_values, (L, M))
    return min(round_to_16(amct_clamp(rank0, L, min(cin, cout))), L)


def mode_ranks(weight: np.ndarray, modes: tuple[int, ...] = (0, 1)) -> tuple[int, ...]:
    """EVBMF rank of each mode unfolding (the usual VBMF rule for Tucker ranks), at least 1."""
    ranks = []
    for mode in modes:
        unfolded = np.moveaxis(np.asarray(weight, np.float64), mode, 0).reshape(weight.shape[mode], -1)
        ranks.append(max(1, evbmf_rank(unfolded)))
    return tuple(ranks)
