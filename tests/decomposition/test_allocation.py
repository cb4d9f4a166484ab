"""The FLOPs target shared out by sensitivity: which layers, which ranks, never a bigger layer."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.algorithms.decomposition.planning import Candidate, allocate
from amct_pipeline.testing.numerics import run_model
from decomp_helpers import conv_chain, feeds, sqnr
from test_target_bound import conv_macs


def _decompose(session, model, calib=None, **options):
    passes = [session.make_pass("decompose", rules="basic", report=False, info_file=None, **options)]
    return session.pipeline(passes).run(model, datasets={"calib": calib} if calib is not None else None)


def _low_rank(cout: int, cin: int, rank: int, seed: int) -> np.ndarray:
    """A 3x3 kernel of Tucker-2 rank (rank, rank): cheap to decompose without error."""
    rng = np.random.default_rng(seed)
    core = rng.normal(0, 1, (rank, rank, 3, 3))
    return np.einsum("or,rshw,si->oihw", rng.normal(0, 1, (cout, rank)), core, rng.normal(0, 1, (rank, cin))) / cin


def _even_rank(cin: int, cout: int, keep: float = 0.5) -> list[int]:
    """The largest proportional Tucker-2 rank keeping at most ``keep`` of a 3x3 layer's MACs."""
    from amct_pipeline.algorithms.decomposition.common import proportional_ranks
    fits = [r for r in proportional_ranks(cin, cout) if cin * r[0] + 9 * r[0] * r[1] + r[1] * cout <= keep * 9 * cin * cout]
    return list(fits[-1])


def test_greedy_takes_the_cheapest_error_first():
    # layer a: saves 50 at error 0.01; layer b: saves 50 at error 0.5 -> only a is cut
    curves = {"a": [Candidate((1,), (50.0,), 0.01)], "b": [Candidate((1,), (50.0,), 0.5)]}
    choice = allocate(curves, {"a": (100.0,), "b": (100.0,)}, (0.0,), (0.0,), 0.75, "params")
    assert choice["a"].rank == (1,) and choice["b"].rank is None and "kept whole" in choice["b"].reason
    with pytest.raises(ValueError, match="cannot be met.*0.500"):
        allocate(curves, {"a": (100.0,), "b": (100.0,)}, (0.0,), (0.0,), 0.3, "params")


def test_sensitive_layer_keeps_more_and_output_error_is_lower(session):
    """A low-rank layer is cut deep, a full-rank one kept rich: better than the same cut spread evenly."""
    model = conv_chain([{"cout": 24, "k": 3, "weight": _low_rank(24, 16, 4, 1)}, {"cout": 24, "k": 3}],
                       cin=16, hw=12, batch="N")
    calib, held_out = feeds(model, 8, seed=1, batches=2), feeds(model, 8, seed=2)[0]
    result = _decompose(session, model, calib, method="tucker2", target=0.5, data_aware=True, dataset="calib")
    ranks = result.stats_for("decompose")["ranks"]
    assert sum(ranks.get("conv0", [16, 24])) < sum(ranks.get("conv1", [16, 24]))
    assert sum(conv_macs(result.model).values()) <= 0.5 * sum(conv_macs(model).values())
    even = _decompose(session, model, calib, method="tucker2", data_aware=True, dataset="calib",
                      ranks={"conv0": _even_rank(16, 24), "conv1": _even_rank(24, 24)})
    assert sum(conv_macs(even.model).values()) >= 0.9 * sum(conv_macs(result.model).values())   # a like budget
    reference = run_model(model, held_out)
    assert sqnr(reference, run_model(result.model, held_out)) > sqnr(reference, run_model(even.model, held_out)) + 1


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2", "cp"])
def test_no_layer_grows(session, method):
    """Near-full targets reach ranks where a decomposition costs more than the layer: never chosen."""
    model = conv_chain([{"cout": 8, "k": 3}, {"cout": 12, "k": 3}, {"cout": 8, "k": 5}], cin=8, hw=10)
    result = _decompose(session, model, method=method, target=0.95)
    before, after = conv_macs(model), conv_macs(result.model)
    for layer in result.artifacts["decomposition"].report.layers:
        children = sum(v for name, v in after.items() if name.startswith(layer.name) and name not in before)
        assert children < before[layer.name], layer.name
        assert layer.flops_after < layer.flops_before


def test_few_input_channels_are_left_alone_by_default(session):
    model = conv_chain([{"cout": 16, "k": 3}, {"cout": 16, "k": 3}], cin=3, hw=10)
    stats = _decompose(session, model, method="tucker2", target=0.5).stats_for("decompose")
    assert "conv0" in stats["skipped"] and "3 channel(s) (< min_in_channels 8)" in stats["skipped"]["conv0"]
    again = _decompose(session, model, method="tucker2", target=0.5, min_in_channels=1).stats_for("decompose")
    assert "conv0" not in again["skipped"] or "min_in_channels" not in again["skipped"]["conv0"]
    with pytest.raises(Exception, match="min_in_channels"):
        _decompose(session, model, method="tucker2", min_in_channels=100_000)


def test_nothing_decomposed_is_a_warning_with_reason_counts(session):
    model = conv_chain([{"cout": 8, "k": 1}, {"cout": 8, "k": 1}, {"cout": 8, "k": 3, "group": 8}], cin=8)
    with pytest.warns(UserWarning, match=r"no layer was decomposed \(3 Conv layer\(s\) left alone: "
                                         r"2 x kernel 1x1 is too small; 1 x group=8\)"):
        result = _decompose(session, model, method="tucker2", target=0.5)
    assert result.stats_for("decompose")["decomposed"] == 0
