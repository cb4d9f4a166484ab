"""The one pass interface: metadata, an options model, and ``run(graph, ctx) -> PassResult``."""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ..options import NoOptions, Options

__all__ = ["json_text", "float_reference", "keep_float_values", "FLOAT_VALUES", "Pass", "PassResult", "PassContext", "Artifacts", "UndeclaredArtifactError", "PIPELINE_METADATA_KEY"]

# metadata key of a written model that holds the pipeline (textual form) that made it
PIPELINE_METADATA_KEY = "amct_pipeline.pipeline"


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the graph changed, counts worth reporting, and a text report.

    Passes never print: a ``report`` (e.g. decompose's table) reaches the user through the
    pipeline result (``PipelineResult.reports``) and instruments; the CLI prints it after the run.
    """

    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)
    report: str = ""


class Pass(abc.ABC):
    """Base of every pass. Subclasses set the class attributes and implement ``run``.

    Rules: no state kept across runs (everything goes in ``ctx.artifacts``); ``modified`` is
    computed, never assumed; a pass that renames or removes layers updates the artifacts that
    name them; every artifact a pass writes is declared (``produces``, or ``produced`` when its
    options add some): the manager checks the dataflow with the declarations before running and
    refuses a write of any undeclared artifact while the pass runs.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()     # artifacts an earlier pass must produce
    produces: ClassVar[frozenset[str]] = frozenset()     # artifacts this pass writes whatever its options
    # option field -> registry it names ("calibrators", "datasets", ...): checked before running
    references: ClassVar[Mapping[str, str]] = {}
    # options that are output file-name templates ({model} only; see files.render_filename) and
    # options that name files the pass reads (never overwritten by the run): checked before running
    writes: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()
    # options among ``writes`` that are PNG reports: matplotlib is required before the run starts
    plots: ClassVar[tuple[str, ...]] = ()
    # True for passes that add, remove or rename layers: later passes' ``check_model`` cannot see them
    changes_layers: ClassVar[bool] = False

    def output_files(self, render, session) -> list[tuple[str, str]]:
        """(option, file name) of every file this pass may write. ``render(template, option)`` fills a
        template and checks the name; override when names are derived (``lower``, ``save``)."""
        return [(option, render(getattr(self.options, option), option))
                for option in self.writes if getattr(self.options, option, None)]

    def __init__(self, options: Options | Mapping[str, Any] | None = None) -> None:
        if options is None or isinstance(options, Mapping):
            options = self.Options.model_validate(dict(options or {}))
        self.options = options

    @abc.abstractmethod
    def run(self, graph, ctx: "PassContext") -> PassResult: ...

    def check_model(self, graph, writes_files: bool) -> None:
        """Checks that need the input model (layer names and types), run before any pass: raise
        ConfigError. Called only while no earlier pass ``changes_layers``."""

    def produced(self, session) -> frozenset[str]:
        """Every artifact this instance may write: ``produces``, plus what its options add.

        Override when options add artifacts (match_layers with ``amct_config``; lower adds what its
        targets declare, looked up in ``session``'s registries; unknown names are skipped).
        """
        return frozenset(self.produces)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


class UndeclaredArtifactError(RuntimeError):
    """A pass wrote an artifact it does not declare: a bug in the pass (or in a target it runs)."""

    def __init__(self, writer: str, artifact: str, declared: frozenset[str]) -> None:
        self.writer, self.artifact, self.declared = writer, artifact, declared
        super().__init__(f"internal error: pass '{writer}' wrote artifact '{artifact}', which it does not declare "
                         f"(declared: {', '.join(sorted(declared)) or 'none'}); add it to the pass's `produces` "
                         "(or to the `produces` of the lowering target that makes it)")


class Artifacts(dict):
    """``ctx.artifacts``: the named results passes hand on, a dict.

    While a pass runs, the manager lets it write (set, setdefault, update, delete, pop) only the
    artifacts it declares (``Pass.produced``); reading is free. Outside a run nothing is checked.
    """

    _writer: str | None = None
    _declared: frozenset[str] = frozenset()

    def restrict(self, writer: str | None, declared: frozenset[str] = frozenset()) -> None:
        """Only ``declared`` may be written, by ``writer`` (a pass name), until ``restrict(None)``."""
        self._writer, self._declared = writer, frozenset(declared)

    def _check(self, keys) -> None:
        if self._writer is not None:
            for key in keys:
                if key not in self._declared:
                    raise UndeclaredArtifactError(self._writer, key, self._declared)

    def __setitem__(self, key, value) -> None:
        self._check([key])
        super().__setitem__(key, value)

    def __delitem__(self, key) -> None:
        self._check([key])
        super().__delitem__(key)

    def setdefault(self, key, default=None):
        self._check([key])
        return super().setdefault(key, default)

    def pop(self, key, *default):
        self._check([key])
        return super().pop(key, *default)

    def popitem(self):
        self._check(list(self)[-1:])
        return super().popitem()

    def clear(self) -> None:
        self._check(list(self))
        super().clear()

    def update(self, *args, **kwargs) -> None:
        other = dict(*args, **kwargs)
        self._check(other)
        super().update(other)

    def __ior__(self, other):
        self.update(other)
        return self


class PassContext:
    """Everything a pass may use besides the graph; one per pipeline run, never global."""

    def __init__(self, session, *, datasets: Mapping[str, Any], outputs, seed: int = 0,
                 pipeline_text: str = "", model_name: str = "model", progress: bool = False) -> None:
        self.session = session
        self.artifacts = Artifacts()             # name -> artifact; writes checked against declarations
        self.datasets = dict(datasets)           # name -> DataSource (see runtime.data)
        self.outputs = outputs                   # OutputStage: files appear only if all passes succeed
        self.seed = seed
        self.pipeline_text = pipeline_text
        self.model_name = model_name
        self.progress = progress
        self.pass_name = ""
        self.pass_index = -1

    @property
    def logger(self) -> logging.Logger:
        return logging.getLogger(f"amct_pipeline.passes.{self.pass_name or 'pipeline'}")

    def dataset(self, name: str):
        try:
            return self.datasets[name]
        except KeyError:
            from ..errors import ConfigError
            raise ConfigError(f"dataset '{name}' was not given; bind it with --data {name}=PATH "
                              f"or datasets={{'{name}': ...}}") from None

    def output_path(self, filename: str) -> Path:
        return self.outputs.path(filename)

    def file_name(self, template: str, option: str, *, fragment: bool = False) -> str:
        """An output file-name option with ``{model}`` filled in (see ``files.render_filename``)."""
        from ..files import render_filename
        return render_filename(template, f"passes[{self.pass_index}].options.{option}", model=self.model_name,
                               source=f"pass '{self.pass_name}'", fragment=fragment)


# artifact: constant name -> its float model's values, for constants a pass replaced for the quantized
# model (biases shifted by bias correction, retrained weights and biases); the first original is kept
FLOAT_VALUES = "float_values"


def keep_float_values(ctx: PassContext, originals: dict[str, Any]) -> None:
    """Record the float values of constants a pass is replacing (an earlier pass's record wins: it
    holds the float model's)."""
    ctx.artifacts[FLOAT_VALUES] = {**originals, **(ctx.artifacts.get(FLOAT_VALUES) or {})}


def float_reference(graph, ctx: PassContext):
    """The float function the run quantizes: ``graph`` itself, or a copy with the float values of the
    constants passes replaced put back (``float_values``: biases ``quantize_weights{bias_correction}``
    shifted, weights and biases ``retrain`` learned). Those fit the quantized model; a pass that
    measures against the float model (retraining's targets, output errors) must not take them for the
    float model's (super-resolution's shifted graph is 26 dB off it)."""
    saved = ctx.artifacts.get(FLOAT_VALUES)
    if not saved:
        return graph
    copy = type(graph)(graph.gs.copy(), graph.meta, graph.name)
    tensors = copy.gs.tensors()
    for name, values in saved.items():
        if name in tensors:
            tensors[name].values = values
    return copy


def json_text(data: Any) -> str:
    """Indented JSON of a report, non-finite floats (an error of exactly zero: SQNR inf) as null."""
    import json
    import math

    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"
