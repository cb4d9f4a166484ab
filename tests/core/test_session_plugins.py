"""Sessions own plugins and registries; built-ins and third parties use the same hooks."""
import subprocess
import sys
import types

import pytest

from amct_pipeline import Pass, PassResult
from amct_pipeline.errors import PluginError
from amct_pipeline.plugins import hookimpl
from amct_pipeline.session import AUTOLOAD_ENV, Session


class TouchPass(Pass):
    name = "touch"
    summary = "A test pass that changes nothing."

    def run(self, graph, ctx):
        return PassResult(False, {"nodes": len(graph.nodes)})


def _plugin_module(name, *classes, hook="amct_register_passes"):
    module = types.ModuleType(name)
    impl = hookimpl(lambda: list(classes))
    impl.__name__ = hook
    setattr(module, hook, impl)
    return module


def test_builtins_are_registered_through_hooks(session):
    assert {"fuse_bn", "match_layers", "save"} <= set(session.registry("passes").names())
    assert "npy" in session.registry("readers")
    provider = session.registry("passes").entry("fuse_bn").provider
    assert "plugin 'builtin'" in provider


def test_duplicate_name_is_refused_naming_both_providers():
    class Clash(TouchPass):
        name = "fuse_bn"
    with pytest.raises(PluginError) as info:
        Session(load_entrypoints=False, plugins=[_plugin_module("clash", Clash)])
    message = str(info.value)
    assert "Clash" in message and "FuseBatchNormPass" in message


def test_misspelled_hook_is_an_error():
    module = types.ModuleType("typo")
    module.amct_register_pases = hookimpl(lambda: [])
    with pytest.raises(PluginError, match="amct_register_pases"):
        Session(load_entrypoints=False, plugins=[module])


def test_sessions_do_not_share_registrations():
    first, second = Session(load_entrypoints=False), Session(load_entrypoints=False)
    first.register_pass(TouchPass)
    assert "touch" in first.registry("passes")
    assert "touch" not in second.registry("passes")


class _FakeEntryPoint:
    def __init__(self, name, module):
        self.name, self.group, self.value, self._module = name, "amct_pipeline", module.__name__, module

    def load(self):
        return self._module


class _FakeDist:
    def __init__(self, entry_points):
        self.entry_points = entry_points
        self.metadata = {"name": "fake-dist"}
        self.version = "1.0"

    @property
    def name(self):
        return "fake-dist"


@pytest.fixture
def fake_entrypoint(monkeypatch):
    module = _plugin_module("fake_plugin", TouchPass)
    dist = _FakeDist([_FakeEntryPoint("fake", module)])
    monkeypatch.setattr("importlib.metadata.distributions", lambda **kwargs: [dist])
    monkeypatch.delenv(AUTOLOAD_ENV, raising=False)
    return module


def test_entry_points_autoload(fake_entrypoint):
    session = Session()
    assert "touch" in session.registry("passes")
    assert any(name == "fake" for name, _ in session.plugin_names())


def test_autoload_can_be_switched_off(fake_entrypoint, monkeypatch):
    assert "touch" not in Session(load_entrypoints=False).registry("passes")
    monkeypatch.setenv(AUTOLOAD_ENV, "1")
    assert "touch" not in Session().registry("passes")


def test_block_list(fake_entrypoint):
    assert "touch" not in Session(block=["fake"]).registry("passes")


def test_import_has_no_side_effects():
    code = ("import sys, amct_pipeline, amct_pipeline.plugins;"
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('onnxruntime', 'tensorly', 'pluggy', 'onnx')];"
            "print(','.join(sorted(set(m.split('.')[0] for m in heavy))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert "onnxruntime" not in out and "tensorly" not in out


def test_plugin_bases_come_from_the_top_level_lazily():
    code = ("import sys, amct_pipeline;"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('amct_pipeline', 'numpy', 'onnx', 'pydantic', 'pluggy')));"
            "amct_pipeline.ActivationCalibrator;"
            "print('onnxruntime' in sys.modules, 'tensorly' in sys.modules)")
    lines = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert lines == ["['amct_pipeline']", "False False"]      # importing defines names, nothing more
    import amct_pipeline
    from amct_pipeline.algorithms import base
    from amct_pipeline.passes.base import Pass as PassBase
    for name in ("ActivationCalibrator", "ActQuantParams", "WeightQuantizer", "WeightQuantParams",
                 "DecompositionMethod", "LoweringTarget", "LoweringContext"):
        assert getattr(amct_pipeline, name) is getattr(base, name) and name in amct_pipeline.__all__
    assert amct_pipeline.Pass is PassBase and "LoweringTarget" in dir(amct_pipeline)
    from amct_pipeline.algorithms.targets.base import PlanTarget
    assert amct_pipeline.PlanTarget is PlanTarget and issubclass(PlanTarget, base.LoweringTarget)
