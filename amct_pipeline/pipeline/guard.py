"""What a run will read and write, checked before any work starts.

A pass declares the options that are output file-name templates (``Pass.writes``) and the options
that name files it reads (``Pass.reads``); ``Pass.output_files`` lists the names it may write. Before
the model is loaded the guard checks the output folder, renders every template (``{model}`` only),
and refuses any planned output that is not a bare name or that is one of the run's inputs: the
model, its external data, the pipeline file, data files, and files named by ``reads`` options.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

from ..errors import ConfigError, Problem
from ..files import OutputError, file_kind, files_under, is_within, render_filename

__all__ = ["RunGuard", "output_name_problems", "planned_outputs", "declared_writes", "declared_reads"]

# built-in passes that do not declare ``writes`` themselves yet (class path -> options)
_UNDECLARED_WRITES = {"amct_pipeline.passes.decompose:DecomposePass": ("info_file", "report_file", "plot")}


def _key(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def declared_writes(pass_) -> tuple[str, ...]:
    return tuple(getattr(type(pass_), "writes", ()) or _UNDECLARED_WRITES.get(_key(type(pass_)), ()))


def declared_reads(pass_) -> tuple[str, ...]:
    return tuple(getattr(type(pass_), "reads", ()) or ())


def planned_outputs(pass_, session, *, model_name: str, source: str, where: str) -> list[tuple[str, str]]:
    """(option path, file name) of every file ``pass_`` may write; a bad template raises ConfigError."""
    def render(template: str, option: str, fragment: bool = False) -> str:
        return render_filename(template, f"{where}.options.{option}", model=model_name, source=source,
                               fragment=fragment)
    if getattr(type(pass_), "writes", ()):
        names = pass_.output_files(render, session)
    else:
        names = [(option, render(getattr(pass_.options, option), option))
                 for option in declared_writes(pass_) if getattr(pass_.options, option, None)]
    return [(option if option.startswith(where) else f"{where}.options.{option}", name) for option, name in names]


def output_name_problems(session, source: str, where: str, pass_) -> list[Problem]:
    """Problems of a pass's file-name options, found when the pipeline is built (no model needed)."""
    try:
        planned_outputs(pass_, session, model_name="model", source=source, where=where)
    except ConfigError as exc:
        return exc.problems
    return []


def _require_regular_if_present(path: str, where: str) -> None:
    """A file an option names may be missing (the pass says so) but never a FIFO or device (a hang)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not stat.S_ISREG(mode):
        raise ConfigError([Problem(where.split(": ")[0], where.split(": ", 1)[1],
                                   f"{path} is a {file_kind(mode)}, not a regular file")])


def _has_matplotlib() -> bool:
    import importlib.util
    return importlib.util.find_spec("matplotlib") is not None


class RunGuard:
    """The checks of one run that need no graph (``before_loading``) and those that do (``after_loading``)."""

    def __init__(self, pipeline, stage, model: Any, model_name: str | None, instruments: Iterable[Any]) -> None:
        self.pipeline, self.stage, self.model = pipeline, stage, model
        self.instruments = list(instruments)
        is_path = isinstance(model, (str, Path))
        self.model_name = model_name or (Path(model).stem if is_path else "model")

    def before_loading(self, datasets: Mapping[str, Any]) -> None:
        stage, spec = self.stage, self.pipeline.spec
        stage.prepare()
        if isinstance(self.model, (str, Path)):
            stage.protect(self.model)
        if spec.source not in ("<dict>", "<text>") and not spec.source.startswith("<"):
            pipeline_file = Path(spec.base_dir) / Path(spec.source).name
            if pipeline_file.is_file():
                stage.protect(pipeline_file)
        for path in self._data_paths(datasets):
            for file in files_under(path):
                stage.protect(file)
        for index, pass_ in enumerate(self.pipeline.passes):
            for option in declared_reads(pass_):
                value = getattr(pass_.options, option, None)
                if isinstance(value, str) and value:
                    _require_regular_if_present(value, f"{spec.source}: passes[{index}].options.{option}")
                    stage.protect(value)
        self._check_names()
        self._check_plots()

    def _check_plots(self) -> None:
        """A PNG report asked for where matplotlib is missing fails now, not after the passes before it."""
        if self.stage.directory is None:
            return
        for index, pass_ in enumerate(self.pipeline.passes):
            for option in getattr(type(pass_), "plots", ()):
                if getattr(pass_.options, option, None) and not _has_matplotlib():
                    raise ConfigError([Problem(self.pipeline.spec.source, f"passes[{index}].options.{option}",
                                               "asks for a PNG but matplotlib is not installed",
                                               "pip install 'amct-pipeline[plots]' or drop the option")])

    def after_loading(self, graph, sources: Mapping[str, Any]) -> None:
        for tensor in graph.gs.tensors().values():
            path = getattr(getattr(tensor, "_values", None), "path", None)
            if isinstance(path, Path):
                self.stage.protect(path)
        for source in sources.values():
            for file in getattr(source, "files", ()) or ():
                self.stage.protect(file)
        self._check_names()
        self._check_model(graph)

    def _check_model(self, graph) -> None:
        """Each pass's model-dependent checks, up to the first pass that changes the layers."""
        writes_files = self.stage.directory is not None
        for pass_ in self.pipeline.passes:
            pass_.check_model(graph, writes_files)
            if pass_.changes_layers:
                return

    def _data_paths(self, datasets: Mapping[str, Any]) -> list[Path]:
        spec, paths = self.pipeline.spec, []
        for name in set(spec.datasets) | set(datasets):
            value = datasets.get(name)
            if isinstance(value, (str, Path)):
                paths.append(Path(value))
            elif value is None and name in spec.datasets and spec.datasets[name].path:
                given = Path(spec.datasets[name].path)
                paths.append(given if given.is_absolute() else Path(spec.base_dir) / given)
        return [p for p in paths if p.exists()]

    def _check_names(self) -> None:
        names = []
        problems = []
        for index, pass_ in enumerate(self.pipeline.passes):
            try:
                names += planned_outputs(pass_, self.pipeline.session, model_name=self.model_name,
                                         source=self.pipeline.spec.source, where=f"passes[{index}]")
            except ConfigError as exc:
                problems += exc.problems
        if problems:
            raise ConfigError(problems)
        self.stage.check_names(names, source=self.pipeline.spec.source)
        for instrument in self.instruments:
            folder = getattr(instrument, "directory", None)
            if isinstance(folder, Path):
                self._check_dump_folder(folder)

    def _check_dump_folder(self, folder: Path) -> None:
        probe = folder
        while not probe.exists() and probe.parent != probe:
            probe = probe.parent
        if probe.exists() and not probe.is_dir():
            what = "is" if probe == folder else f"is inside {probe}, which is"
            raise OutputError(f"the IR dump folder {folder} {what} a {file_kind(probe.stat().st_mode)}, "
                              "not a folder; choose another --dump-ir folder")
        inside = sorted(p for p in self.stage.protected if is_within(p, folder))
        if inside:
            raise OutputError(f"the IR dump folder {folder} holds {inside[0]}, an input of this run; "
                              "choose another --dump-ir folder")
