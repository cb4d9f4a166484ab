"""The one pass interface: metadata, an options model, and ``run(graph, ctx) -> PassResult``."""
from __future__ import annotations

import abc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Mapping

from ..options import NoOptions, Options

__all__ = ["Pass", "PassResult", "PassContext"]


@dataclass(frozen=True)
class PassResult:
    """What a pass did: whether the graph changed, and counts worth reporting."""

    modified: bool
    stats: Mapping[str, Any] = field(default_factory=dict)


class Pass(abc.ABC):
    """Base of every pass. Subclasses set the class attributes and implement ``run``.

    Rules: no state kept across runs (everything goes in ``ctx.artifacts``); ``modified`` is
    computed, never assumed; a pass that renames or removes layers updates the artifacts that
    name them.
    """

    name: ClassVar[str]
    summary: ClassVar[str] = ""
    Options: ClassVar[type[Options]] = NoOptions
    requires: ClassVar[frozenset[str]] = frozenset()     # artifacts an earlier pass must produce
    produces: ClassVar[frozenset[str]] = frozenset()     # artifacts this pass writes
    # option field -> registry it names ("calibrators", "datasets", ...): checked before running
    references: ClassVar[Mapping[str, str]] = {}
    # options that are output file-name templates ({model} only; see files.render_filename) and
    # options that name files the pass reads (never overwritten by the run): checked before running
    writes: ClassVar[tuple[str, ...]] = ()
    reads: ClassVar[tuple[str, ...]] = ()

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

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"


class PassContext:
    """Everything a pass may use besides the graph; one per pipeline run, never global."""

    def __init__(self, session, *, datasets: Mapping[str, Any], outputs, seed: int = 0,
                 pipeline_text: str = "", model_name: str = "model", progress: bool = False) -> None:
        self.session = session
        self.artifacts: dict[str, Any] = {}
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
