"""analyze: per-layer quantization sensitivity, output effects, FLOPs and bitops (SPEC 8.1, 8.2).

For every layer with activation factors, at the precision ``act_quant`` / ``weight_quant`` give it:

* AMCT's ranking sensitivity: the layer computed on its float input, float vs fake-quant (input and
  weight), on the calibration data: mean over batches of ``0.5 + 0.5 cos`` and the MSE (one run of a
  model that computes every layer's fake-quant twin at once; ``algorithms.sensitivity``);
* its effect on the model's output (``output_effects``): output SQNR when only this layer is
  quantized and when all layers but it are, on the first ``max_samples`` samples (by suffix
  execution: the network from the layer on, fed from one float and one quantized run per batch),
  against the float model (``float_reference``: bias correction's biases belong to the quantized
  layers only);
* FLOPs and bitops per sample (SPEC 8.2), per layer and in total.

Artifact ``sensitivity`` (the JSON's content), file ``<model>_sensitivity.json`` with AMCT's
``ranking_information`` (layer -> similarity, most sensitive first) plus these fields, a markdown
table as the pass's report and, with ``plot`` (matplotlib), a PNG of the bars beside cumulative bitops.
"""
from __future__ import annotations

from typing import Optional

from pydantic import Field, PositiveInt

from ..options import Options
from .base import Pass, PassResult, float_reference, json_text

__all__ = ["AnalyzePass", "AnalyzeOptions"]


class AnalyzeOptions(Options):
    dataset: str = Field("calib", description="Calibration dataset the layers are measured on (streamed).")
    num_batches: Optional[PositiveInt] = Field(None, description="Measure on at most this many batches (default: all).")
    output_effects: bool = Field(True, description="Also measure each layer's effect on the model output "
                                                   "(per layer, two runs of the network after it on "
                                                   "max_samples samples).")
    max_samples: int = Field(16, ge=1, le=4096, description="Samples the output effects are measured on (the "
                                                            "first ones); time grows with layers x samples.")
    output: Optional[str] = Field("{model}_sensitivity.json", description="JSON file written in the output "
                                                                          "directory (null: none).")
    plot: Optional[str] = Field(None, description="PNG of per-layer sensitivity beside cumulative bitops, e.g. "
                                                  "'{model}_sensitivity.png' (needs matplotlib).")
    report_rows: int = Field(0, ge=0, description="Rows of the terminal table, most sensitive first (0: all).")


class AnalyzePass(Pass):
    name = "analyze"
    summary = ("Per-layer quantization sensitivity (AMCT cosine/MSE), output SQNR effects, FLOPs and bitops "
               "(artifact 'sensitivity', <model>_sensitivity.json).")
    Options = AnalyzeOptions
    requires = frozenset({"layer_map", "act_quant", "weight_quant"})
    produces = frozenset({"sensitivity"})
    references = {"dataset": "datasets"}
    writes = ("output", "plot")
    plots = ("plot",)

    def run(self, graph, ctx) -> PassResult:
        from ..algorithms.sensitivity import analyze
        from ..reports.sensitivity import plot_sensitivity, sensitivity_table
        opts = self.options
        result = analyze(graph, ctx.dataset(opts.dataset), ctx.artifacts["layer_map"], ctx.artifacts["act_quant"],
                         ctx.artifacts["weight_quant"], max_samples=opts.max_samples,
                         output_effects=opts.output_effects, num_batches=opts.num_batches, progress=ctx.progress,
                         reference=float_reference(graph, ctx))
        result = {"model": ctx.model_name, "dataset": opts.dataset, **result}
        ctx.artifacts["sensitivity"] = result
        if ctx.outputs.directory is not None:
            if opts.output:
                ctx.output_path(ctx.file_name(opts.output, "output")).write_text(json_text(result))
            if opts.plot:
                plot_sensitivity(result, ctx.output_path(ctx.file_name(opts.plot, "plot")))
        stats = {"layers": len(result["layers"]), "flops": result["total"]["flops"],
                 "bitops": result["total"]["bitops"]}
        if "all_quantized" in result:
            stats["sqnr_db_all_quantized"] = result["all_quantized"]["sqnr_db"]
        return PassResult(False, stats, report=sensitivity_table(result, opts.report_rows))
