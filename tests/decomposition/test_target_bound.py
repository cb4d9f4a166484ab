"""decompose{target: t} is a bound: the decomposed convs keep at most t of their cost, counted as SPEC 8.2
FLOPs and as multiply-accumulates (issue 12 point 10: super-resolution kept 40.07% of the MACs at 0.4)."""
from __future__ import annotations

import onnx
import pytest

from conftest import shared_path
from decomp_helpers import conv_chain, conv_flops, conv_geometry


def conv_macs(model: onnx.ModelProto) -> dict[str, int]:
    """Multiply-accumulates of every Conv (weights x output pixels)."""
    return {node.name: cout * cin_g * kh * kw * h * w for node, cout, cin_g, kh, kw, h, w in conv_geometry(model)}


def kept(original, result, count) -> float:
    """Cost of the decomposed convs after / before, by ``count`` (conv_macs or conv_flops)."""
    before, after = count(original), count(result)
    decomposed = [name for name in before if name not in after]
    children = sum(v for name, v in after.items() if name not in before)
    return children / sum(before[name] for name in decomposed)


def _decompose(session, model, **options):
    return session.pipeline([session.make_pass("decompose", **options)]).run(model)


MODEL_LAYERS = [{"cout": 16, "k": 5}, {"cout": 24, "k": 3, "stride": 2}, {"cout": 32, "k": 3}, {"cout": 9, "k": 3}]


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2", "cp"])
@pytest.mark.parametrize("target", [0.15, 0.25, 0.4, 0.6])
def test_target_bounds_macs_and_flops_on_a_built_model(session, method, target):
    model = conv_chain(MODEL_LAYERS, cin=4, hw=16)
    result = _decompose(session, model, method=method, rules="basic", target=target)
    assert result.stats_for("decompose")["decomposed"] >= 1
    assert kept(model, result.model, conv_macs) <= target
    assert kept(model, result.model, conv_flops) <= target


def test_layers_left_alone_do_not_lend_their_budget(session):
    """A layer left whole counts against the global target at its full cost: the decomposed ones then
    keep less than the target of theirs (the target is over every layer considered)."""
    model = conv_chain([{"cout": 2, "k": 3}, {"cout": 32, "k": 3}, {"cout": 32, "k": 3}], cin=2, hw=16)
    result = _decompose(session, model, method="tucker2", rules="basic", target=0.2, min_in_channels=1)
    stats = result.stats_for("decompose")
    assert stats["decomposed"] >= 1
    assert kept(model, result.model, conv_macs) <= 0.2 and kept(model, result.model, conv_flops) <= 0.2
    assert sum(conv_macs(result.model).values()) <= 0.2 * sum(conv_macs(model).values())   # whole layers count


def test_explicit_ranks_count_against_the_target(session):
    model = conv_chain(MODEL_LAYERS, cin=4, hw=16)
    result = _decompose(session, model, method="tucker2", rules="basic", target=0.3, ranks={"conv2": [20, 20]},
                        min_in_channels=1)
    assert result.stats_for("decompose")["ranks"]["conv2"] == [20, 20]
    assert kept(model, result.model, conv_macs) <= 0.3 and kept(model, result.model, conv_flops) <= 0.3


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2"])   # cp (0.40492 before) takes 2 min here;
def test_super_resolution_target_04_is_a_bound(session, method):
    model = onnx.load(str(shared_path("models/super_resolution_op15.onnx")))
    result = _decompose(session, model, method=method, rules="basic", target=0.4)
    stats = result.stats_for("decompose")
    # the 1-channel input conv is left alone by default (min_in_channels); the other three share 0.4
    assert "min_in_channels" in stats["skipped"]["Conv_0"] and stats["decomposed"] >= 2
    macs = kept(model, result.model, conv_macs)
    assert macs <= 0.4                              # tucker2 was 0.40070 before the bound
    assert kept(model, result.model, conv_flops) <= 0.4
