"""lower: turn the float graph plus quantization factors into AMCT's record and quantized models.

1. Builds the lowering plan: per layer with activation factors, its weight codes and its bias
   quantized to INT32 (an overflow is an error naming the layer and suggesting skip_layers).
2. Publishes AMCT's record (scale_d, offset_d, scale_w, offset_w = 0; shift_bit omitted) as
   ``quant_record``.
3. Runs every target in ``targets`` on its own copy of the float graph and writes
   ``<prefix>_<suffix>.onnx`` (AMCT: ``<prefix>_fake_quant_model.onnx``; an empty prefix gives
   ``fake_quant_model.onnx``). Each ModelProto is kept in ``ctx.artifacts["lowered"][target]``.

The float graph is never modified. Matched layers without activation factors stay float (listed in
the stats as ``unquantized``).
"""
from __future__ import annotations

from typing import Any

from pydantic import Field, field_validator, model_validator

from ..errors import ConfigError, Problem
from ..options import Options, parse_options
from .base import Pass, PassResult

__all__ = ["LowerPass", "LowerOptions", "model_filename"]

WHERE = "pass 'lower'"


class LowerOptions(Options):
    targets: list[str] = Field(default_factory=lambda: ["fakequant", "qdq"],
                               description="Lowering targets to produce, in order (see `amct-pipeline list targets`).")
    target_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options per target, e.g. {qdq: {dataset: calib}}.")
    prefix: str = Field("{model}", description="Output files are '<prefix>_<suffix>.onnx'; {model} is the "
                                               "input's stem; empty gives AMCT's bare 'fake_quant_model.onnx'.")

    @field_validator("targets")
    @classmethod
    def _distinct(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("give at least one target")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"target(s) listed twice: {', '.join(repeated)}")
        return values

    @model_validator(mode="after")
    def _options_for_listed(self) -> "LowerOptions":
        stray = [name for name in self.target_options if name not in self.targets]
        if stray:
            raise ValueError(f"target_options for {', '.join(repr(s) for s in stray)}, which "
                             f"{'is' if len(stray) == 1 else 'are'} not in targets {self.targets}")
        return self


class LowerPass(Pass):
    name = "lower"
    summary = "Write AMCT's record and lower the float graph to quantized models (fakequant, qdq, ...)."
    Options = LowerOptions
    requires = frozenset({"layer_map", "act_quant", "weight_quant"})
    produces = frozenset({"quant_record", "lowered"})
    references = {"targets": "targets"}
    writes = ("prefix",)

    def output_files(self, render, session) -> list[tuple[str, str]]:
        prefix = render(self.options.prefix, "prefix", fragment=True)
        registry = session.registry("targets")
        names = [model_filename(prefix, registry.get(t).file_suffix()) for t in self.options.targets if t in registry]
        return [("prefix", n) for name in names for n in (name, name + ".data")]

    def produced(self, session) -> frozenset[str]:
        """``produces`` plus what the listed targets declare (e.g. ascend's 'ascend_report')."""
        registry = session.registry("targets")
        return self.produces.union(*(registry.get(name).produces for name in self.options.targets if name in registry))

    def run(self, graph, ctx) -> PassResult:
        from ..quant.plan import build_plan
        targets = self._targets(ctx)
        plan = build_plan(graph, ctx.artifacts)
        for target in targets:            # every target accepts every layer's precision before any is written
            check = getattr(target, "check_plan", None)
            if check is not None:
                check(plan)
        ctx.artifacts["quant_record"] = plan.record()
        lowered = ctx.artifacts.setdefault("lowered", {})
        files = []
        for target in targets:
            copy, model = self._lower(graph, ctx, target, plan)
            lowered[target.name] = model
            filename = self._write(copy, ctx, target)
            if filename:
                files.append(filename)
        stats = {"layers": len(plan.layers), "per_channel": sum(p.per_channel for p in plan.layers.values()),
                 "unquantized": dict(plan.unquantized), "targets": [t.name for t in targets], "files": files}
        return PassResult(False, stats)

    def _targets(self, ctx) -> list:
        """Target instances with validated options; every problem reported at once."""
        registry = ctx.session.registry("targets")
        targets, problems = [], []
        for name in self.options.targets:
            unknown = registry.unknown(name, WHERE, "targets")    # normally caught when the pipeline is built
            if unknown:
                problems.append(unknown)
                continue
            cls = registry.get(name)
            options, found = parse_options(cls.Options, self.options.target_options.get(name, {}))
            problems += [Problem(WHERE, f"target_options.{name}.{p.path}", p.message, p.hint) for p in found]
            if options is not None:
                targets.append(cls(options))
        if problems:
            raise ConfigError(problems)
        return targets

    def _lower(self, graph, ctx, target, plan):
        from ..algorithms.base import LoweringContext
        from ..ir.edit import copy_graph
        from .base import PIPELINE_METADATA_KEY
        copy = copy_graph(graph)
        copy.meta.metadata[PIPELINE_METADATA_KEY] = ctx.pipeline_text     # how the model was made
        lowering = LoweringContext(plan, ctx.artifacts["layer_map"], ctx.artifacts.get("tensor_quant") or {},
                                   ctx.logger)
        model = target.lower(copy, lowering)
        target.check(model)
        ctx.artifacts.update(lowering.products)
        return copy, model

    def _write(self, copy, ctx, target) -> str | None:
        from ..ir.io import write_model
        if ctx.outputs.directory is None:
            return None
        filename = model_filename(ctx.file_name(self.options.prefix, "prefix", fragment=True), target.file_suffix())
        written = write_model(copy, ctx.output_path(filename))
        for extra in written[1:]:
            ctx.outputs.path(extra.name)     # external data is committed with the model
        return filename


def model_filename(prefix: str, suffix: str) -> str:
    """AMCT's naming: ``<prefix>_<suffix>.onnx``, or ``<suffix>.onnx`` without a prefix."""
    return f"{prefix}_{suffix}.onnx" if prefix else f"{suffix}.onnx"
