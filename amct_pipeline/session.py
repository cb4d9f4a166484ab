"""Session: owns the plugin manager and every registry. No global state anywhere else."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import pluggy

from .errors import ConfigError, PluginError, Problem
from .plugins import PROJECT
from .registry import Registry, UnknownName

__all__ = ["Session", "AUTOLOAD_ENV"]

AUTOLOAD_ENV = "AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD"

# registry kind -> (hook name, base class path); base classes are imported when a Session is made
KINDS = {
    "passes": ("amct_register_passes", "amct_pipeline.passes.base:Pass"),
    "calibrators": ("amct_register_calibrators", "amct_pipeline.algorithms.base:ActivationCalibrator"),
    "weight_quantizers": ("amct_register_weight_quantizers", "amct_pipeline.algorithms.base:WeightQuantizer"),
    "decompositions": ("amct_register_decompositions", "amct_pipeline.algorithms.base:DecompositionMethod"),
    "targets": ("amct_register_targets", "amct_pipeline.algorithms.base:LoweringTarget"),
    "readers": ("amct_register_data_readers", "amct_pipeline.runtime.data:DataReader"),
}
SINGULAR = {"passes": "pass", "calibrators": "calibrator", "weight_quantizers": "weight quantizer",
            "decompositions": "decomposition method", "targets": "lowering target",
            "readers": "data reader", "pipelines": "pipeline preset"}


class Session:
    """A plugin manager plus registries. Create one per embedding; sessions never share state.

    ``load_entrypoints``: load third-party plugins from the ``amct_pipeline`` entry-point group
    (default: yes, unless ``AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD=1``). ``plugins``: extra plugin
    objects or modules to register. ``block``: plugin (entry-point) names not to load.
    """

    def __init__(self, *, load_entrypoints: bool | None = None, plugins: Iterable[Any] = (),
                 block: Iterable[str] = ()) -> None:
        if load_entrypoints is None:
            load_entrypoints = os.environ.get(AUTOLOAD_ENV, "").lower() not in ("1", "true", "yes")
        self.pm = pluggy.PluginManager(PROJECT)
        from .plugins import builtin, hookspecs
        self.pm.add_hookspecs(hookspecs)
        self._distinfo: dict[int, str] = {}
        block = list(block)
        if block:
            _check_block_names(block)
        for name in block:
            self.pm.set_blocked(name)
        self._register(builtin, "builtin")
        if load_entrypoints:
            self._load_entrypoints()
        for plugin in plugins:
            self._register(plugin, None)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {_plugin_label(exc)}: {exc}") from None
        self.registries: dict[str, Registry] = {}
        self._collect()

    # -- plugins -----------------------------------------------------------------------------
    def _register(self, plugin: Any, name: str | None) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            raise PluginError(f"cannot register plugin {name or plugin!r}: {exc}") from None

    def _load_entrypoints(self) -> None:
        """Plugins of the installed environment's entry points only (see plugins/discovery.py)."""
        from .plugins.discovery import entry_points, without_cwd_on_path
        try:
            for ep, dist in entry_points(PROJECT):
                if self.pm.has_plugin(ep.name) or self.pm.is_blocked(ep.name):
                    continue
                with without_cwd_on_path():
                    plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
                self._distinfo[id(plugin)] = f"{dist.metadata['name']} {dist.version}"
        except pluggy.PluginValidationError as exc:
            raise PluginError(f"plugin {_plugin_label(exc)}: {exc}") from None
        except Exception as exc:  # a broken third-party import must not look like our bug
            raise PluginError(f"loading '{PROJECT}' entry-point plugins failed: {type(exc).__name__}: {exc}; "
                              f"block the plugin with --block-plugin NAME or set {AUTOLOAD_ENV}=1") from exc

    def plugin_names(self) -> list[tuple[str, str]]:
        """(plugin name, distribution or module) for every registered plugin."""
        dists = {**{id(plugin): f"{dist.project_name} {dist.version}" for plugin, dist in self.pm.list_plugin_distinfo()},
                 **self._distinfo}
        return [(name, dists.get(id(plugin), getattr(plugin, "__name__", type(plugin).__name__)))
                for name, plugin in sorted(self.pm.list_name_plugin(), key=lambda kv: kv[0])
                if plugin is not None]

    def _collect(self) -> None:
        import importlib
        for kind, (hook, base_path) in KINDS.items():
            module, _, attr = base_path.partition(":")
            registry = self.registries[kind] = Registry(SINGULAR[kind], getattr(importlib.import_module(module), attr))
            for impl in getattr(self.pm.hook, hook).get_hookimpls():
                for cls in impl.function() or ():
                    registry.add(cls, provider=self._provider(cls, impl.plugin_name))
        presets = self.registries["pipelines"] = Registry(SINGULAR["pipelines"])
        for impl in self.pm.hook.amct_register_pipelines.get_hookimpls():
            for name, source in (impl.function() or {}).items():
                presets.add(source, name=name, provider=f"plugin '{impl.plugin_name}'")

    def _provider(self, cls: Any, plugin_name: str) -> str:
        return f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', cls)} (plugin '{plugin_name}')"

    # -- registries --------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        try:
            return self.registries[kind]
        except KeyError:
            raise ConfigError(f"unknown kind '{kind}'; known: {', '.join(self.registries)}") from None

    def register(self, kind: str, obj: Any, *, provider: str = "the embedding application") -> None:
        """Add one contribution to this session only (e.g. a compiler's own pass)."""
        self.registry(kind).add(obj, provider=provider)

    def register_pass(self, cls: Any) -> None:
        self.register("passes", cls)

    def lookup(self, kind: str, name: str) -> Any:
        try:
            return self.registry(kind).get(name)
        except UnknownName as exc:
            raise ConfigError(str(exc)) from None

    def make_algorithm(self, kind: str, name: str, options: Mapping[str, Any] | None = None) -> Any:
        return self.lookup(kind, name)(dict(options or {}))

    def make_pass(self, name: str, **options: Any):
        from .options import parse_options
        cls = self.lookup("passes", name)
        parsed, problems = parse_options(cls.Options, options)
        if problems:
            raise ConfigError([Problem(f"pass '{name}'", p.path, p.message, p.hint) for p in problems])
        return cls(parsed)

    def find(self, name: str) -> list[tuple[str, Any]]:
        """Every (kind, entry) registered under ``name``."""
        return [(kind, reg.entry(name)) for kind, reg in self.registries.items() if name in reg]

    # -- pipelines ---------------------------------------------------------------------------
    def load_pipeline(self, source: Any, *, overrides: Sequence[str] = ()):
        """A PipelineSpec from a file, mapping, textual form, spec, or preset name."""
        from .pipeline.loader import load_pipeline
        if isinstance(source, str) and source in self.registries["pipelines"]:
            preset = self.registries["pipelines"].get(source)
            return load_pipeline(Path(preset) if isinstance(preset, (str, os.PathLike)) else preset,
                                 overrides=overrides)
        return load_pipeline(source, overrides=overrides)

    def build(self, source: Any, *, overrides: Sequence[str] = (), datasets: Iterable[str] = ()):
        """Validate a whole pipeline (no model needed) and return a runnable Pipeline."""
        from .pipeline.manager import build_pipeline
        spec = self.load_pipeline(source, overrides=overrides)
        return build_pipeline(self, spec, extra_datasets=set(datasets))

    def pipeline(self, passes: Sequence[Any], *, datasets: Mapping[str, Any] | None = None, name: str = "pipeline"):
        """A Pipeline from Pass objects built in Python."""
        from .pipeline.manager import Pipeline
        from .pipeline.spec import PassSpec, PipelineSpec
        specs = [PassSpec(**{"pass": p.name, "options": p.options.model_dump(exclude_defaults=True)}) for p in passes]
        spec = PipelineSpec(name=name, passes=specs, datasets=datasets or {})
        pipeline = Pipeline(self, spec, list(passes))
        pipeline.check_dataflow()
        return pipeline

    def run(self, model: Any, pipeline: Any, **kwargs: Any):
        """Build (if needed) and run a pipeline on a ModelProto or model path."""
        from .pipeline.manager import Pipeline
        if not isinstance(pipeline, Pipeline):
            pipeline = self.build(pipeline, datasets=(kwargs.get("datasets") or {}).keys())
        return pipeline.run(model, **kwargs)


def _check_block_names(names: Sequence[str]) -> None:
    """A blocked name that no installed plugin has is a typo: the plugin meant would still load."""
    from .options import suggest
    from .plugins.discovery import installed_plugin_names
    known = installed_plugin_names(PROJECT)
    for name in names:
        if name not in known and name != "builtin":
            hint = suggest(name, known)
            raise PluginError(f"--block-plugin {name}: no installed plugin is named '{name}'"
                              + (f"; {hint}" if hint else "")
                              + f" (installed plugins: {', '.join(known) if known else 'none'})")


def _plugin_label(exc: pluggy.PluginValidationError) -> str:
    plugin = getattr(exc, "plugin", None)
    return repr(getattr(plugin, "__name__", plugin))
