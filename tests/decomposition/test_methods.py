"""The three methods in numpy: exact at full rank, rank limits, EVBMF and AMCT's rank rule, data-aware math."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.decomposition import (ConvLayer, Cp, SpatialSvd, Tucker2, chain_cost,
                                                    compose_kernels, relative_error)
from amct_pipeline.algorithms.decomposition.evbmf import amct_clamp, amct_rank, evbmf_rank, round_to_16
from amct_pipeline.algorithms.decomposition.stats import LeastSquaresRefit, whitening

SC = ConvLayer("sc", 6, 10, (3, 3), (2, 2), (0, 0, 1, 1), has_bias=True, in_hw=(9, 9))    # Cout >= Cin
FC = ConvLayer("fc", 10, 4, (5, 5), (1, 1), (2, 2, 2, 2), in_hw=(8, 8))                   # Cout < Cin


def _weight(layer: ConvLayer, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=layer.weight_shape)


@pytest.mark.parametrize("method", [SpatialSvd(), Tucker2()], ids=lambda m: m.name)
@pytest.mark.parametrize("layer", [SC, FC], ids=["SC", "FC"])
def test_full_rank_is_exact(method, layer):
    w = _weight(layer)
    rank = method.max_rank(layer)
    children = method.structure(layer, rank)
    weights = method.decompose(layer, w, rank)
    assert [tuple(x.shape) for x in weights] == [c.weight_shape for c in children]
    assert relative_error(w, compose_kernels(children, weights)) < 1e-10
    assert [c.has_bias for c in children] == [False] * (len(children) - 1) + [layer.has_bias]


def test_spatial_svd_modes_follow_amct():
    """Cout >= Cin: (k x 1) first (SCFK); Cout < Cin: W transposed, (1 x k) first (FCFK)."""
    method = SpatialSvd()
    assert method.mode(SC) == "SCFK" and [c.kernel for c in method.structure(SC, (4,))] == [(3, 1), (1, 3)]
    assert method.mode(FC) == "FCFK" and [c.kernel for c in method.structure(FC, (4,))] == [(1, 5), (5, 1)]
    first, last = method.structure(SC, (4,))
    assert (first.stride, first.pads, last.stride, last.pads) == ((2, 1), (0, 0, 1, 0), (1, 2), (0, 0, 0, 1))


def test_cp_recovers_an_exact_cp_tensor():
    rng = np.random.default_rng(3)
    factors = [rng.normal(size=(n, 3)) for n in (10, 6, 3, 3)]
    w = np.einsum("ar,br,cr,dr->abcd", *factors)
    method = Cp()
    children = method.structure(SC, (3,))
    assert [(c.kernel, c.group) for c in children] == [((1, 1), 1), ((3, 1), 3), ((1, 3), 3), ((1, 1), 1)]
    assert relative_error(w, compose_kernels(children, method.decompose(SC, w, (3,)))) < 1e-4


def test_rank_limits_and_forms():
    assert Tucker2().normalize_rank(SC, 5) == (5, 5)
    assert Tucker2().normalize_rank(SC, [6, 10]) == (6, 10)
    with pytest.raises(ValueError, match="rank_out 11 is larger than layer 'sc' allows: at most 10"):
        Tucker2().normalize_rank(SC, [3, 11])
    with pytest.raises(ValueError, match="rank 19 is larger than layer 'sc' allows: at most 18"):
        SpatialSvd().normalize_rank(SC, 19)                     # L = 3 x min(6, 10)
    with pytest.raises(ValueError, match="larger than"):
        Cp().normalize_rank(SC, 6 * 3 * 3 + 1)                  # product of all dims but the largest
    with pytest.raises(ValueError, match="positive integer"):
        SpatialSvd().normalize_rank(SC, 0)
    with pytest.raises(ValueError, match="takes 1 rank value"):
        SpatialSvd().normalize_rank(SC, [2, 3])


def test_evbmf_finds_the_signal_rank():
    rng = np.random.default_rng(7)
    signal = rng.normal(size=(40, 6)) @ rng.normal(size=(6, 120)) * 2.0
    assert evbmf_rank(signal + rng.normal(scale=0.3, size=signal.shape)) == 6
    assert evbmf_rank(rng.normal(size=(40, 120))) <= 1          # pure noise: nothing above the threshold


def test_amct_rank_rule_and_doc_example():
    assert [round_to_16(r) for r in (5, 16, 17, 27, 32, 40)] == [16, 16, 16, 32, 32, 48]
    assert amct_clamp(3, 192, 64) == 27 and amct_clamp(100, 192, 64) == 32       # d = 6: [L/7, L/6]
    assert amct_clamp(100, 1280, 256) == 256 and amct_clamp(999, 1280, 256) == 320   # d = 4 from 256 channels
    layer = ConvLayer("c", 64, 64, (3, 3), (1, 1), (1, 1, 1, 1), in_hw=(16, 16))
    w = _weight(layer)
    rank = SpatialSvd().default_rank(layer, w)
    assert rank == (amct_rank(np.linalg.svd(SpatialSvd().matrix(layer, w), compute_uv=False), 64, 64, 3, 3),) == (32,)
    # AMCT's doc: 64x64x3x3 -> 32x64x3x1 + 64x32x1x3 saves 66.7 % of the FLOPs
    children = SpatialSvd().structure(layer, rank)
    assert [c.weight_shape for c in children] == [(32, 64, 3, 1), (64, 32, 1, 3)]
    saved = 1 - chain_cost(children, (16, 16)).params / chain_cost([layer.as_child], (16, 16)).params
    assert saved == pytest.approx(2 / 3)


@pytest.mark.parametrize("method", [SpatialSvd(), Tucker2(), Cp({"n_iter_max": 30})], ids=lambda m: m.name)
def test_whitening_lowers_the_response_error(method):
    """With strongly correlated inputs, decomposing W·C^{1/2} beats decomposing W on E‖(W − Ŵ)x‖²."""
    layer = ConvLayer("c", 12, 12, (3, 3), (1, 1), (1, 1, 1, 1))
    rng = np.random.default_rng(5)
    w = rng.normal(size=layer.weight_shape)
    first = method.structure(layer, (2,) * len(method.rank_names))[0]
    dim = first.cin * first.kernel[0] * first.kernel[1]
    mixing = rng.normal(size=(dim, dim)) * np.logspace(0, -3, dim)
    cov = mixing @ mixing.T
    rank = (3,) * len(method.rank_names) if method.name != "cp" else (6,)

    def response_error(weights):
        delta = (w - compose_kernels(method.structure(layer, rank), weights))
        per_tap = delta.reshape(layer.cout, layer.cin, -1) if dim == layer.cin else None
        if per_tap is not None:
            return sum(np.trace(per_tap[:, :, t] @ cov @ per_tap[:, :, t].T) for t in range(per_tap.shape[2]))
        m = method.matrix(layer, delta)                            # spatial SVD: patch covariance
        return np.trace(m.T @ cov @ m)

    free = response_error(method.decompose(layer, w, rank))
    aware = response_error(method.decompose(layer, w, rank, input_cov=cov))
    assert aware < 0.75 * free, (aware, free)


def test_least_squares_refit_recovers_weights_and_scores_them():
    rng = np.random.default_rng(4)
    w, b = rng.normal(size=(6, 3)), rng.normal(size=3)
    acc = LeastSquaresRefit(6, 3, intercept=True, ridge=1e-9)
    for _ in range(3):                                # streamed batches
        f = rng.normal(size=(200, 6))
        acc.add(f, f @ w + b + rng.normal(scale=0.01, size=(200, 3)))
    w_fit, b_fit = acc.solve(np.zeros((6, 3)), np.zeros(3))
    assert np.allclose(w_fit, w, atol=0.01) and np.allclose(b_fit, b, atol=0.01)
    assert acc.sqnr_db(w_fit, b_fit) > 35 > acc.sqnr_db(w * 0.9, b) > 15


def test_whitening_inverts():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 5))
    root, inverse = whitening(a @ a.T)
    assert np.allclose(root @ root, a @ a.T) and np.allclose(root @ inverse, np.eye(5))
