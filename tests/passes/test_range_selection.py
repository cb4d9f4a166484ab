"""Candidate ranges (calibrate{candidates}) picked per tensor by output error (refine_ranges)."""
from __future__ import annotations

import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.runtime.data import ArraySource


def _source(count: int = 48, batch_size: int = 16, seed: int = 1) -> ArraySource:
    return ArraySource("calib", {"x": build_demo_data(count, seed=seed)}, DatasetSpec(batch_size=batch_size), "test")


def _run(session, text: str, source=None):
    return session.build(text, datasets=["calib"]).run(build_demo_model(), datasets={"calib": source or _source()})


def test_candidates_are_the_other_calibrators_ranges_of_every_tensor(session):
    result = _run(session, "fuse_bn,match_layers,calibrate{algorithm=mean_minmax block_outputs=true "
                           "candidates=[minmax,mse,mean_minmax]}")
    candidates = result.artifacts["range_candidates"]
    act, blocks, layer_map = result.artifacts["act_quant"], result.artifacts["tensor_quant"], result.artifacts["layer_map"]
    assert set(candidates) == {layer.input for layer in layer_map.layers()} | set(blocks)
    for layer in layer_map.layers():
        first, *others = candidates[layer.input]
        assert first is act[layer.name]                     # the chosen range comes first
        assert len(others) == 2                               # minmax's, mse's (mean_minmax is the pass's own)
    # the candidates are what the calibrators give alone on the same batches (bounds fitted alike)
    alone = _run(session, "fuse_bn,match_layers,calibrate{algorithm=minmax block_outputs=true}")
    for layer in layer_map.layers():
        assert alone.artifacts["act_quant"][layer.name] in candidates[layer.input]


def test_candidates_follow_the_tensor_configuration_and_are_validated(session):
    result = _run(session, "fuse_bn,match_layers,calibrate{algorithm=mean_minmax algorithm_options={asymmetric=false} "
                           "candidates=[minmax]}")
    for ranges in result.artifacts["range_candidates"].values():
        assert all(p.offset == 0 for p in ranges)           # symmetric like the tensor's own range
    with pytest.raises(ConfigError, match="candidates"):
        session.build("fuse_bn,match_layers,calibrate{candidates=[minmaxx]}", datasets=["calib"])
    with pytest.raises(ConfigError, match="percentile"):
        session.build("fuse_bn,match_layers,calibrate{candidates=[percentile] "
                      "candidate_options={percentile={percentile=101}}}", datasets=["calib"])


def test_selection_picks_per_tensor_by_output_error_and_never_worsens_it(session):
    text = ("fuse_bn,match_layers,calibrate{algorithm=mean_minmax block_outputs=true candidates=[minmax,mse]},"
            "quantize_weights,refine_ranges{factors=[] min_improvement=0}")
    result = _run(session, text)
    stats = result.stats_for("refine_ranges")
    assert stats["sqnr_db_after"] >= stats["sqnr_db_before"] and stats["evaluations"] > 1
    assert stats["whole_model_pick"] in (0, 1, 2)
    candidates = result.artifacts["range_candidates"]
    act, blocks = result.artifacts["act_quant"], result.artifacts["tensor_quant"]
    for layer in result.artifacts["layer_map"].layers():
        assert act[layer.name] in candidates[layer.input]   # a pick, never a new range
    for tensor, params in blocks.items():
        assert params in candidates[tensor]
    changed = sum(act[layer.name] is not candidates[layer.input][0] for layer in result.artifacts["layer_map"].layers())
    changed += sum(params is not candidates[t][0] for t, params in blocks.items())
    assert changed == stats["tensors_changed"]
    # without candidates and factors there is nothing to try
    plain = _run(session, text.replace("refine_ranges{", "refine_ranges{candidates=false "))
    assert plain.stats_for("refine_ranges")["tensors_changed"] == 0


def test_whole_model_pick_and_evaluation_budget(session):
    """The whole model first takes each calibrator's ranges in turn; max_evaluations bounds the rest."""
    text = ("fuse_bn,match_layers,calibrate{algorithm=minmax block_outputs=true candidates=[mean_minmax]},"
            "quantize_weights,refine_ranges{factors=[] max_evaluations=3 min_improvement=0}")
    result = _run(session, text)
    stats = result.stats_for("refine_ranges")
    assert stats["evaluations"] == 3                          # the start, the whole-model candidate, one tensor
    candidates = result.artifacts["range_candidates"]
    act = result.artifacts["act_quant"]
    picked = [act[layer.name] is candidates[layer.input][1] for layer in result.artifacts["layer_map"].layers()]
    if stats["whole_model_pick"] == 1:
        assert sum(picked) >= len(picked) - 1

