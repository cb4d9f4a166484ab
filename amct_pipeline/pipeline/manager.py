"""Building (all validation, no model) and running pipelines."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import onnx

from ..errors import ConfigError, PassError, Problem
from ..options import parse_options, suggest
from ..passes.base import PIPELINE_METADATA_KEY, Pass, PassContext, PassResult
from .guard import RunGuard, output_name_problems
from .staging import OutputStage
from .instruments import PassInstrument
from .spec import PipelineSpec
from .textual import format_pipeline

__all__ = ["Pipeline", "PipelineResult", "OutputStage", "build_pipeline", "PIPELINE_METADATA_KEY"]


def build_pipeline(session, spec: PipelineSpec, *, extra_datasets: set[str] = frozenset()) -> "Pipeline":
    """Check pass names, options, references and dataflow, collecting every problem."""
    problems: list[Problem] = []
    passes: list[Pass] = []
    problems += _check_datasets(session, spec)
    datasets = set(spec.datasets) | set(extra_datasets)
    for index, step in enumerate(spec.passes):
        where = f"passes[{index}]"
        registry = session.registry("passes")
        unknown = registry.unknown(step.name, spec.source, f"{where}.pass")
        if unknown:
            problems.append(unknown)
            continue
        cls = registry.get(step.name)
        options, option_problems = parse_options(cls.Options, step.options)
        problems += [Problem(spec.source, f"{where}.options.{p.path}", f"{p.message} (pass '{step.name}')", p.hint)
                     for p in option_problems]
        if options is not None:
            problems += _check_references(session, spec.source, where, cls, options, datasets)
            pass_ = cls(options)
            problems += output_name_problems(session, spec.source, where, pass_)
            passes.append(pass_)
    if not problems:
        problems += _dataflow_problems(session, spec.source, passes)
    if problems:
        raise ConfigError(problems)
    return Pipeline(session, spec, passes)


def _check_datasets(session, spec: PipelineSpec) -> list[Problem]:
    readers = session.registry("readers")
    found = (readers.unknown(data.reader, spec.source, f"datasets.{name}.reader") for name, data in spec.datasets.items())
    return [problem for problem in found if problem]


def _check_references(session, source: str, where: str, cls: type[Pass], options, datasets: set[str]) -> list[Problem]:
    """Names in options that point into a registry (or at datasets) must exist; a list checks each.

    Options of the named algorithms are validated too: ``algorithm_options`` beside ``algorithm``,
    and ``target_options: {name: {...}}`` beside a list ``targets``.
    """
    problems = []
    for option, kind in cls.references.items():
        value = getattr(options, option, None)
        is_list = isinstance(value, (list, tuple))
        names = list(value) if is_list else [] if value is None else [value]
        path = f"{where}.options.{option}"
        found = []
        for index, name in enumerate(names):
            located = _check_name(session, source, f"{path}[{index}]" if is_list else path, kind, name, datasets)
            problems += located
            found += [name] if not located else []
        if kind == "datasets":
            continue
        companion = f"{option[:-1] if is_list else option}_options"
        per_name = getattr(options, companion, None)
        if per_name is None:
            continue
        per_name = per_name if is_list else {value: per_name}
        for name in found:
            problems += _check_algorithm_options(session, source, f"{where}.options.{companion}", kind, name,
                                                 per_name.get(name), is_list)
    return problems


def _check_name(session, source: str, path: str, kind: str, name: str, datasets: set[str]) -> list[Problem]:
    if kind == "datasets":
        if name in datasets:
            return []
        return [Problem(source, path, f"dataset '{name}' is not defined",
                        suggest(name, datasets) or f"define it under 'datasets' or bind it with --data {name}=PATH")]
    problem = session.registry(kind).unknown(name, source, path)
    return [problem] if problem else []


def _check_algorithm_options(session, source, path, kind, name, values, keyed) -> list[Problem]:
    if values is None:
        return []
    registry = session.registry(kind)
    _, sub = parse_options(registry.get(name).Options, values)
    prefix = f"{path}.{name}" if keyed else path
    return [Problem(source, f"{prefix}.{p.path}", f"{p.message} ({registry.kind} '{name}')", p.hint) for p in sub]


def _dataflow_problems(session, source: str, passes: Sequence[Pass]) -> list[Problem]:
    """Every required artifact is produced by an earlier pass, as the passes declare (``produced``:
    options-aware; the manager refuses undeclared writes at run time, so the declarations are complete)."""
    produced = [p.produced(session) for p in passes]
    producers: dict[str, list[str]] = {}
    for p, artifacts in zip(passes, produced):
        for artifact in artifacts:
            producers.setdefault(artifact, []).append(p.name)
    available: set[str] = set()
    problems = []
    for index, (p, artifacts) in enumerate(zip(passes, produced)):
        for artifact in sorted(p.requires - available):
            by = producers.get(artifact)
            hint = f"add '{by[0]}' before it" if by else "no pass in this pipeline produces it"
            problems.append(Problem(source, f"passes[{index}]", f"'{p.name}' requires artifact '{artifact}', "
                                    "which no earlier pass produces", hint))
        available |= artifacts
    return problems


@dataclass
class PipelineResult:
    """What a run gives back. ``model`` is exported from ``graph`` on first access."""

    graph: Any
    artifacts: dict[str, Any]
    stats: list[tuple[str, dict[str, Any]]]
    pipeline_text: str
    files: list[Path] = field(default_factory=list)
    reports: list[tuple[str, str]] = field(default_factory=list)     # (pass name, text) of passes that gave one
    _model: onnx.ModelProto | None = field(default=None, repr=False)

    @property
    def model(self) -> onnx.ModelProto:
        if self._model is None:
            self._model = self.graph.to_proto()
        return self._model

    def stats_for(self, pass_name: str) -> dict[str, Any]:
        """Stats of the first pass with that name."""
        return next(s for name, s in self.stats if name == pass_name)


class Pipeline:
    """An ordered, validated list of passes, runnable on any number of models."""

    def __init__(self, session, spec: PipelineSpec, passes: list[Pass]) -> None:
        self.session, self.spec, self.passes = session, spec, passes

    @property
    def text(self) -> str:
        return format_pipeline([{"pass": p.name, "options": _explicit_options(s)}
                                for p, s in zip(self.passes, self.spec.passes)])

    def check_dataflow(self) -> None:
        problems = _dataflow_problems(self.session, self.spec.source, self.passes)
        if problems:
            raise ConfigError(problems)

    def run(self, model: Any, *, datasets: Mapping[str, Any] | None = None, output_dir: str | Path | None = None,
            instruments: Sequence[PassInstrument] = (), verify_each: Any = None, progress: bool = False,
            model_name: str | None = None) -> PipelineResult:
        """Run on a ModelProto (never mutated) or a model path; files go to ``output_dir``."""
        from ..ir import load_graph
        from ..runtime.data import open_datasets
        verify_each = self.spec.context.verify_each if verify_each is None else verify_each
        stage = OutputStage(output_dir)
        guard = RunGuard(self, stage, model, model_name, instruments)
        guard.before_loading(datasets or {})           # output folder, names, inputs: before any work
        sources = open_datasets(self.session, self.spec, datasets or {})
        graph = load_graph(model)
        if model_name:
            graph.name = model_name
        guard.after_loading(graph, sources)            # external data and data files are inputs too
        ctx = PassContext(self.session, datasets=sources, outputs=stage, seed=self.spec.context.seed,
                          pipeline_text=self.text, model_name=graph.name, progress=progress)
        try:
            results = self._run_passes(graph, ctx, list(instruments), verify_each)
            graph.meta.metadata[PIPELINE_METADATA_KEY] = self.text
            result = PipelineResult(graph, ctx.artifacts, [(name, dict(r.stats)) for name, r in results], self.text,
                                    reports=[(name, r.report) for name, r in results if r.report])
            result.files = stage.commit()
        finally:
            stage.abort()                              # after a failure: staged files and new empty folders
        for instrument in reversed(instruments):
            instrument.after_pipeline(result)
        return result

    def _run_passes(self, graph, ctx: PassContext, instruments: list[PassInstrument],
                    verify_each) -> list[tuple[str, PassResult]]:
        from ..ir.verify import verify_graph
        for instrument in instruments:
            instrument.before_pipeline(self)
        results, ran = [], []
        for index, pass_ in enumerate(self.passes):
            ctx.pass_name, ctx.pass_index = pass_.name, index
            for instrument in instruments:
                instrument.before_pass(index, pass_, graph)
            try:
                ctx.artifacts.restrict(pass_.name, pass_.produced(self.session))
                try:
                    result = pass_.run(graph, ctx)
                finally:
                    ctx.artifacts.restrict(None)
                if not isinstance(result, PassResult):
                    raise TypeError(f"run() returned {type(result).__name__}, not PassResult")
                if result.modified and verify_each:
                    verify_graph(graph, where=f"the graph after passes[{index}] '{pass_.name}'",
                                 full=verify_each == "full")
            except Exception as exc:
                for instrument in reversed(instruments):
                    instrument.after_pass_failed(index, pass_, exc)
                cause = ctx.outputs.write_error(exc) or exc     # a full disk names the output file
                raise PassError(index, pass_.name, ran, cause) from exc
            for instrument in reversed(instruments):
                instrument.after_pass(index, pass_, graph, result)
            results.append((pass_.name, result))
            ran.append(pass_.name)
        return results


def _explicit_options(step) -> dict[str, Any]:
    return dict(step.options)
