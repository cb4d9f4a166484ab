"""The pass manager: validation before loading, verification, failures, embedding guarantees."""
from pathlib import Path

import numpy as np
import onnx
import pytest

from amct_pipeline import Pass, PassResult
from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import ConfigError, PassError
from amct_pipeline.pipeline.instruments import DumpIR, Timing
from amct_pipeline.session import Session
from amct_pipeline.testing.numerics import max_rel_diff, run_model


ROOT = Path(__file__).resolve().parents[2]


class NeedsMapPass(Pass):
    name = "needs_map"
    summary = "Requires the layer map."
    requires = frozenset({"layer_map"})

    def run(self, graph, ctx):
        return PassResult(False, {"layers": len(ctx.artifacts["layer_map"])})


class BreakGraphPass(Pass):
    name = "break_graph"
    summary = "Leaves a dangling input behind (to test verification)."

    def run(self, graph, ctx):
        import onnx_graphsurgeon as gs
        node = graph.nodes[0]
        node.inputs[0] = gs.Variable("nowhere", dtype=np.float32)
        return PassResult(True, {})


class BoomPass(Pass):
    name = "boom"
    summary = "Raises."

    def run(self, graph, ctx):
        raise ValueError("kaboom")


@pytest.fixture
def session():
    s = Session(load_entrypoints=False)
    for cls in (NeedsMapPass, BreakGraphPass, BoomPass):
        s.register_pass(cls)
    return s


def test_every_problem_is_reported_before_any_model_is_loaded(session, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("passes:\n  - pass: fuse_bm\n  - pass: match_layers\n    options: {skip_layrs: [a]}\n"
                    "  - pass: save\n    options: {filenme: x}\n")
    with pytest.raises(ConfigError) as info:
        session.build(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert lines[0] == f"{path}: passes[0].pass: unknown pass 'fuse_bm'; did you mean 'fuse_bn'?"
    assert "passes[1].options.skip_layrs" in lines[1] and "did you mean 'skip_layers'" in lines[1]
    assert "passes[2].options.filenme" in lines[2] and "did you mean 'filename'" in lines[2]


def test_missing_artifact_names_the_producer(session):
    with pytest.raises(ConfigError) as info:
        session.build({"passes": [{"pass": "needs_map"}, {"pass": "match_layers"}]})
    message = str(info.value)
    assert "passes[0]" in message and "requires artifact 'layer_map'" in message
    assert "add 'match_layers' before it" in message
    assert session.build("match_layers,needs_map").passes[1].name == "needs_map"


def test_undefined_dataset_is_reported(session):
    class UsesData(Pass):
        name = "uses_data"
        from pydantic import BaseModel  # noqa: F401  (keep the class body simple)

        class Options(__import__("amct_pipeline").Options):
            dataset: str = "calib"
        references = {"dataset": "datasets"}

        def run(self, graph, ctx):
            return PassResult(False)
    session.register_pass(UsesData)
    with pytest.raises(ConfigError, match="dataset 'calib' is not defined"):
        session.build("uses_data")
    assert session.build("uses_data", datasets=["calib"]).passes


def test_verification_after_a_modifying_pass(session):
    with pytest.raises(PassError) as info:
        session.build("break_graph").run(build_demo_model())
    assert "passes[0] 'break_graph'" in str(info.value) and "nowhere" in str(info.value)


def test_failure_names_pass_index_and_predecessors(session, tmp_path):
    pipeline = session.build("fuse_bn,match_layers,boom,save")
    with pytest.raises(PassError) as info:
        pipeline.run(build_demo_model(), output_dir=tmp_path)
    message = str(info.value)
    assert "passes[2] 'boom' failed" in message and "kaboom" in message
    assert "fuse_bn, match_layers" in message
    assert list(tmp_path.iterdir()) == []          # nothing written


def test_embedding_never_mutates_the_callers_model(session):
    model = build_demo_model()
    before = model.SerializeToString()
    result = session.build("fuse_bn,match_layers").run(model)
    assert model.SerializeToString() == before
    assert isinstance(result.model, onnx.ModelProto)
    assert "layer_map" in result.artifacts
    assert result.stats_for("fuse_bn")["fused"] == 2
    assert result.pipeline_text == "fuse_bn,match_layers"
    feeds = {"input": build_demo_data(4)}
    assert max_rel_diff(run_model(model, feeds)[0], run_model(result.model, feeds)[0]) < 1e-5


def test_pipelines_from_python_objects(session):
    pipeline = session.pipeline([session.make_pass("fuse_bn", skip_fusion_layers=["conv1"]),
                                 session.make_pass("match_layers")])
    result = pipeline.run(build_demo_model())
    assert result.stats_for("fuse_bn")["fused"] == 1
    assert pipeline.text == "fuse_bn{skip_fusion_layers=[conv1]},match_layers"


def test_instruments_time_and_dump(session, tmp_path):
    timing, dump = Timing(), DumpIR(tmp_path / "ir")
    session.build("fuse_bn,match_layers").run(build_demo_model(), instruments=[timing, dump])
    assert [label for label, _ in timing.times] == ["0:fuse_bn", "1:match_layers"]
    assert [p.name for p in (tmp_path / "ir").iterdir()] == ["00_after_fuse_bn.onnx"]


def test_outputs_are_byte_identical_across_runs(session, tmp_path):
    model = build_demo_model()
    for run in ("a", "b"):
        session.build(str(ROOT / "pipelines" / "fuse_bn.yaml")).run(model, output_dir=tmp_path / run, model_name="demo")
    a, b = (tmp_path / r / "demo_fused.onnx" for r in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()


class ReportingPass(Pass):
    name = "reporting"
    summary = "Gives a report instead of printing it."

    def run(self, graph, ctx):
        return PassResult(False, {}, report=f"{len(graph.nodes)} nodes")


def test_reports_come_with_the_result_and_nothing_is_printed(session, capfd):
    session.register_pass(ReportingPass)
    result = session.build("reporting,fuse_bn,reporting").run(build_demo_model())
    assert result.reports == [("reporting", "10 nodes"), ("reporting", "8 nodes")]    # fuse_bn gave none
    assert capfd.readouterr() == ("", "")


class SneakyPass(Pass):
    """Declares 'declared' but also writes what its options name."""

    name = "sneaky"
    summary = "Writes an artifact it does not declare."
    produces = frozenset({"declared"})

    class Options(__import__("amct_pipeline").Options):
        write: str = "declared"
        how: str = "set"

    def run(self, graph, ctx):
        if self.options.how == "set":
            ctx.artifacts[self.options.write] = 1
        elif self.options.how == "setdefault":
            ctx.artifacts.setdefault(self.options.write, {})["x"] = 1
        else:
            ctx.artifacts.update({self.options.write: 1})
        return PassResult(False)


@pytest.mark.parametrize("how", ["set", "setdefault", "update"])
def test_an_undeclared_artifact_is_refused_naming_pass_and_artifact(session, how):
    session.register_pass(SneakyPass)
    result = session.pipeline([SneakyPass({"how": how})]).run(build_demo_model())
    assert "declared" in result.artifacts
    result.artifacts["anything"] = 2              # outside a run nothing is checked
    with pytest.raises(PassError) as info:
        session.pipeline([SneakyPass({"write": "hidden", "how": how})]).run(build_demo_model())
    message = str(info.value)
    assert "passes[0] 'sneaky' failed" in message and "internal error" in message
    assert "pass 'sneaky' wrote artifact 'hidden', which it does not declare (declared: declared)" in message


def test_every_shipped_pass_declares_what_it_writes(session):
    """The declarations the static check uses are options-aware (per instance)."""
    assert session.make_pass("match_layers").produced(session) == {"layer_map"}
    assert session.make_pass("match_layers", amct_config="q.json").produced(session) == {"layer_map", "amct_config"}
    lower = session.make_pass("lower", targets=["fakequant", "ascend"])
    assert lower.produced(session) == {"quant_record", "lowered", "ascend_report"}
    assert session.make_pass("lower").produced(session) == {"quant_record", "lowered"}


def test_the_static_check_sees_options_dependent_and_target_artifacts(session):
    from amct_pipeline.algorithms.base import LoweringTarget

    class NeedsConfig(Pass):
        name = "needs_config"
        requires = frozenset({"amct_config"})

        def run(self, graph, ctx):
            return PassResult(False)

    class Reported(LoweringTarget):
        name = "reported"
        produces = frozenset({"reported_report"})

        def lower(self, graph, ctx):
            ctx.products["reported_report"] = "ok"
            return graph.to_proto()

    class NeedsReport(NeedsConfig):
        name = "needs_report"
        requires = frozenset({"reported_report"})

    session.register_pass(NeedsConfig)
    session.register_pass(NeedsReport)
    session.register("targets", Reported)
    with pytest.raises(ConfigError, match="'needs_config' requires artifact 'amct_config'"):
        session.build("match_layers,needs_config")
    assert session.build("match_layers{amct_config=q.json},needs_config").passes
    ptq = "match_layers,calibrate,quantize_weights,lower{targets=[%s]},needs_report"
    with pytest.raises(ConfigError, match="'needs_report' requires artifact 'reported_report'"):
        session.build(ptq % "fakequant", datasets=["calib"])
    assert session.build(ptq % "reported", datasets=["calib"]).passes


@pytest.mark.parametrize("text", ["analyze{plot=s.png}", "mixed_precision{max_evaluations=2}",
                                  "decompose{plot=d.png dataset=calib}"])
def test_a_plot_without_matplotlib_fails_before_any_pass(session, tmp_path, monkeypatch, text):
    """Every pass declaring a PNG option is checked by one mechanism before the model is loaded."""
    import amct_pipeline.pipeline.guard as guard
    monkeypatch.setattr(guard, "_has_matplotlib", lambda: False)
    head = "" if text.startswith("decompose") else "fuse_bn,match_layers,calibrate,quantize_weights,"
    pipeline = session.build(head + text, datasets=["calib"])
    timing = Timing()
    with pytest.raises(ConfigError, match=r"options\.plot: asks for a PNG but matplotlib is not installed"):
        pipeline.run(build_demo_model(), output_dir=tmp_path / "out", instruments=[timing],
                     datasets={"calib": build_demo_data(4)})
    assert timing.times == [] and not (tmp_path / "out").exists()
