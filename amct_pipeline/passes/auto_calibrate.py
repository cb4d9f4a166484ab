"""auto_calibrate: AMCT's accuracy-based auto calibration (SPEC 8.1) on the calibrated model.

1. ``original = evaluate(float model)``; ``metric_eval(original, original)`` must accept.
2. The fully quantized model (``act_quant`` / ``weight_quant`` as calibrated) is evaluated; if it
   is acceptable nothing is rolled back.
3. Else the layers are ranked (artifact ``sensitivity`` from ``analyze`` when present, otherwise one
   run of the probe model: ``0.5 + 0.5 cos`` ascending, or MSE descending) and ``strategy`` searches
   the most sensitive prefix of the ranking:
   ``BinarySearch`` (AMCT) rolls the prefix back to float; ``raise_precision`` raises it instead
   (INT16 activations on Conv / Gemm / ConvTranspose, INT8 weights where INT4 was asked) and only
   tries prefixes whose bitops stay within ``bitops_budget`` x the asked configuration's.
4. Writes AMCT's ``accuracy_based_auto_calibration_final_config.json`` (quant config with
   ``quant_enable`` false for roll-backs), ``..._ranking_information.json`` (layer -> sensitivity,
   most sensitive first), ``..._record.json`` (every trial) and the final models
   (``<prefix>_fake_quant_model.onnx``, ``<prefix>_deploy_model.onnx``), and hands the chosen
   ``act_quant`` / ``weight_quant`` on (``export_amct`` after it writes the record). When nothing
   meets the metric it fails, one line, and writes nothing (AMCT saves no model then).

Every evaluation is remembered in ``<output-dir>/.amct-autocal-<model>/state.json`` (written
atomically after each one, with the best configuration so far), keyed by the model, the factors
and the options: a run killed and started again with the same command re-uses what was evaluated and
ends with the same answer. The folder is removed when the run succeeds.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..options import Options
from .base import Pass, PassResult, float_reference, json_text

__all__ = ["AutoCalibratePass", "AutoCalibrateOptions", "FILES"]

WHERE = "pass 'auto_calibrate'"
FILES = {"config": "accuracy_based_auto_calibration_final_config.json",
         "ranking": "accuracy_based_auto_calibration_ranking_information.json",
         "record": "accuracy_based_auto_calibration_record.json"}


class AutoCalibrateOptions(Options):
    evaluator: Any = Field(None, description="Required: 'module:Class' of an installed module (the class is "
                                             "instantiated without arguments; importing it runs its code) or, from "
                                             "Python, an evaluator object: AMCT's AutoCalibrationEvaluatorBase "
                                             "(evaluate, metric_eval).")

    @field_validator("evaluator")
    @classmethod
    def _evaluator_form(cls, value: Any) -> Any:
        if isinstance(value, str):
            module, sep, attr = value.partition(":")
            if not sep or not all(p.isidentifier() for p in module.split(".")) or not attr.isidentifier():
                raise ValueError(f"expected 'package.module:Class', got {value!r}")
        return value
    strategy: Literal["BinarySearch", "raise_precision"] = Field(
        "BinarySearch", description="BinarySearch: roll the most sensitive layers back to float (AMCT); "
                                    "raise_precision: raise their precision within bitops_budget.")
    sensitivity: Literal["CosineSimilarity", "MSE"] = Field("CosineSimilarity", description="Ranking measure.")
    dataset: str = Field("calib", description="Dataset of the ranking run (when no 'sensitivity' artifact).")
    bitops_budget: float = Field(1.5, gt=0, le=16, description="raise_precision: most bitops allowed, relative "
                                                               "to the configuration as asked.")
    targets: list[str] = Field(default_factory=lambda: ["fakequant", "ascend"],
                               description="Final models written (fakequant, ascend = AMCT's deploy model, qdq).")
    prefix: str = Field("{model}", description="Final models are '<prefix>_<suffix>.onnx'.")
    resume: bool = Field(True, description="Re-use the evaluations of an interrupted run with the same inputs.")


class AutoCalibratePass(Pass):
    name = "auto_calibrate"
    summary = ("AMCT's accuracy-based auto calibration: roll back (or raise) the most sensitive layers until a "
               "user evaluator's metric is met.")
    Options = AutoCalibrateOptions
    requires = frozenset({"layer_map", "act_quant", "weight_quant"})
    produces = frozenset({"act_quant", "weight_quant", "auto_calibration"})
    references = {"dataset": "datasets"}
    writes = ("prefix",)

    def output_files(self, render, session) -> list[tuple[str, str]]:
        prefix = render(self.options.prefix, "prefix", fragment=True)
        registry = session.registry("targets")
        models = [f"{prefix}_{registry.get(t).file_suffix()}.onnx" if prefix else f"{registry.get(t).file_suffix()}.onnx"
                  for t in self.options.targets if t in registry]
        return [("prefix", n) for n in models] + [("auto_calibrate", n) for n in FILES.values()]

    def check_model(self, graph, writes_files: bool) -> None:
        if self.options.evaluator is None:           # fail before the passes before this one run the model
            load_evaluator(None)

    def run(self, graph, ctx) -> PassResult:
        evaluator = load_evaluator(self.options.evaluator)
        search = _Search(graph, ctx, self.options, evaluator)
        try:
            outcome = search.run()
        finally:
            search.close()
        ctx.artifacts["act_quant"], ctx.artifacts["weight_quant"] = outcome["act_quant"], outcome["weight_quant"]
        ctx.artifacts["auto_calibration"] = outcome["record"]
        files = search.write(outcome) if ctx.outputs.directory is not None else []
        search.finish()
        record = outcome["record"]
        stats = {"strategy": self.options.strategy, "changed": len(record["result"]["layers"]),
                 "evaluations": record["evaluations"], "original_metric": record["original_metric"],
                 "final_metric": record["result"]["metric"], "files": files}
        return PassResult(False, stats, report=_report(record))


# -- the evaluator ---------------------------------------------------------------------------------
def load_evaluator(spec: Any):
    """An evaluator object from ``module:Class`` (imported from the installed environment, the class
    called without arguments) or the object itself; one-line errors."""
    if spec is None:
        raise ConfigError(f"{WHERE}: no evaluator given; set options.evaluator to 'module:Class' (CLI: --set "
                          "passes.auto_calibrate.options.evaluator=module:Class)")
    if isinstance(spec, str):
        module, _, attr = spec.partition(":")
        try:
            cls = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(f"{WHERE}: evaluator {spec!r}: cannot import it ({exc}); install the module or "
                              "put it on PYTHONPATH") from None
        try:
            obj = cls()
        except Exception as exc:
            raise ConfigError(f"{WHERE}: evaluator {spec!r}: creating it failed: {type(exc).__name__}: {exc}") from None
    else:
        obj = spec
    missing = [m for m in ("evaluate", "metric_eval") if not callable(getattr(obj, m, None))]
    if missing:
        raise ConfigError(f"{WHERE}: evaluator {_name(spec)} has no {', '.join(missing)} method; subclass "
                          "amct_pipeline.algorithms.autocal.AutoCalibrationEvaluatorBase")
    return obj


def _name(spec: Any) -> str:
    return repr(spec) if isinstance(spec, str) else f"'{type(spec).__name__}'"


def _call(evaluator, method: str, *args):
    try:
        return getattr(evaluator, method)(*args)
    except ConfigError:
        raise
    except Exception as exc:
        text = " ".join(str(exc).split())[:200]
        raise ConfigError(f"{WHERE}: evaluator '{type(evaluator).__name__}'.{method} raised "
                          f"{type(exc).__name__}: {text}") from None


# -- the search ---------------------------------------------------------------------------------------
class _Search:
    """Trials, their memo on disk, and the final artifacts of one auto-calibration run."""

    def __init__(self, graph, ctx, options: AutoCalibrateOptions, evaluator) -> None:
        from ..algorithms.sensitivity import layer_precision
        self.graph, self.ctx, self.options, self.evaluator = graph, ctx, options, evaluator
        self.layer_map = ctx.artifacts["layer_map"]
        self.act_quant, self.weight_quant = dict(ctx.artifacts["act_quant"]), dict(ctx.artifacts["weight_quant"])
        self.layers = [layer for layer in self.layer_map.layers() if self.act_quant.get(layer.name) is not None]
        if not self.layers:
            raise ConfigError(f"{WHERE}: no layer is quantized; run calibrate and quantize_weights before it")
        self.asked = {layer.name: layer_precision(layer, self.act_quant, self.weight_quant) for layer in self.layers}
        self.rows = self._measure()
        self.ranking = self._ranking()
        self.workdir, self.owned = self._workdir()
        self.state = self._load_state()
        self.trials: list[dict[str, Any]] = []

    # -- ranking and costs
    def _measure(self) -> dict[str, dict[str, Any]]:
        """Per layer: similarity, MSE, input range, FLOPs (the analyze artifact, else one probe run)."""
        given = self.ctx.artifacts.get("sensitivity")
        if given and {r["name"] for r in given["layers"]} >= {layer.name for layer in self.layers}:
            return {r["name"]: r for r in given["layers"]}
        from ..algorithms.sensitivity import layer_cost, probe_statistics
        stats = probe_statistics(self.graph, self.ctx.dataset(self.options.dataset), self.layers, self.act_quant,
                                 self.weight_quant, progress=self.ctx.progress)
        rows = {}
        for layer in self.layers:
            s = stats[layer.name]
            flops, _ = layer_cost(self.graph, layer, s, self.asked[layer.name])
            rows[layer.name] = {"name": layer.name, "cosine_similarity": s.similarity, "mse": s.mse,
                                "input_range": [s.in_min, s.in_max], "flops": flops}
        return rows

    def _ranking(self) -> list[str]:
        """Layer names, most sensitive first (ties in graph order)."""
        index = {layer.name: i for i, layer in enumerate(self.layers)}
        if self.options.sensitivity == "MSE":
            return sorted(index, key=lambda n: (-self.rows[n]["mse"], index[n]))
        return sorted(index, key=lambda n: (self.rows[n]["cosine_similarity"], index[n]))

    def ranking_information(self) -> dict[str, float]:
        key = "mse" if self.options.sensitivity == "MSE" else "cosine_similarity"
        return {n: float(self.rows[n][key]) for n in self.ranking}

    def bitops(self, config: Mapping[str, Any]) -> int:
        from ..quant.cost import bitops
        return sum(bitops(self.rows[n]["flops"], p.act, p.wts if self.layer_map[n].weight is not None else 1)
                   for n, p in config.items())

    # -- memo on disk
    def _workdir(self) -> tuple[Path, bool]:
        if self.ctx.outputs.directory is None:
            return Path(tempfile.mkdtemp(prefix="amct-autocal-")), True
        folder = Path(self.ctx.outputs.directory) / f".amct-autocal-{self.ctx.model_name}"
        folder.mkdir(parents=True, exist_ok=True)
        return folder, False

    def _fingerprint(self) -> str:
        digest = hashlib.sha256(self.graph.to_proto().SerializeToString())
        for name in self.ranking:
            act, wts = self.act_quant[name], self.weight_quant.get(name)
            digest.update(f"{name}:{act.scale!r}:{act.offset}:{act.num_bits}".encode())
            if wts is not None:
                digest.update(np.asarray(wts.scale, np.float32).tobytes())
        options = self.options.model_dump(exclude={"evaluator", "targets", "prefix", "resume"})
        digest.update(json.dumps([options, _name(self.options.evaluator)], sort_keys=True, default=str).encode())
        return digest.hexdigest()

    def _load_state(self) -> dict[str, Any]:
        key = self._fingerprint()
        path = self.workdir / "state.json"
        if self.options.resume and path.is_file():
            try:
                state = json.loads(path.read_text())
                if state.get("key") == key and isinstance(state.get("evaluations"), dict):
                    state["resumed"] = len(state["evaluations"])
                    return state
            except (OSError, ValueError):
                pass          # a state we cannot read is started afresh
        return {"key": key, "evaluations": {}, "best": None, "resumed": 0}

    def _save_state(self) -> None:
        from ..ir.io import atomic_path
        with atomic_path(self.workdir / "state.json") as tmp:
            tmp.write_text(json.dumps(self.state, indent=1, sort_keys=True))

    # -- trials
    def config(self, changed: list[str]) -> dict[str, Any]:
        """The asked precisions with ``changed`` rolled back (float) or raised (per strategy)."""
        config = dict(self.asked)
        for name in changed:
            if self.options.strategy == "BinarySearch":
                config.pop(name)
            else:
                config[name] = self.raised(name)
        return config

    def raised(self, name: str):
        from ..algorithms.sensitivity import INT16_ACT_TYPES, Precision
        asked, layer = self.asked[name], self.layer_map[name]
        act = 16 if asked.act == 8 and layer.op_type in INT16_ACT_TYPES else asked.act
        wts = 8 if asked.wts == 4 else asked.wts
        return Precision(act, wts)

    def factors(self, config: Mapping[str, Any]) -> tuple[dict, dict]:
        """act_quant / weight_quant for ``config`` (raised layers get INT16 / INT8 factors)."""
        from ..quant.math import arq, scale_offset_from_range
        from ..quant.weights import deconv_channel_view, deconv_from_channel_view, effective_weight
        from ..quant.params import WeightQuantParams
        acts, wts = {}, {}
        for name, precision in config.items():
            act, weight, layer = self.act_quant[name], self.weight_quant.get(name), self.layer_map[name]
            if precision.act != act.num_bits:
                lo, hi = self.rows[name]["input_range"]
                act = scale_offset_from_range(lo, hi, precision.act, symmetric=act.offset == 0 and lo < 0)
            if weight is not None and layer.weight is not None and precision.wts != weight.num_bits:
                group = layer.group if layer.op_type == "ConvTranspose" else 1
                view = deconv_channel_view(effective_weight(self.graph, layer), group)
                axis = layer.channel_axis if weight.scale.size > 1 else None
                q = arq(view, axis, precision.wts)
                weight = WeightQuantParams(q.scale, deconv_from_channel_view(q.quantized, group), q.num_bits)
            acts[name] = act
            if weight is not None:
                wts[name] = weight
        return acts, wts

    def lower(self, config, target_name: str, path: Path) -> None:
        from ..algorithms.base import LoweringContext
        from ..ir.edit import copy_graph
        from ..ir.io import write_model
        from ..quant.plan import TENSOR_QUANT_ARTIFACT, build_plan
        acts, wts = self.factors(config)
        artifacts = {"layer_map": self.layer_map, "act_quant": acts, "weight_quant": wts}
        tensors = self.ctx.artifacts.get(TENSOR_QUANT_ARTIFACT)
        if tensors:
            artifacts[TENSOR_QUANT_ARTIFACT] = tensors
        plan = build_plan(self.graph, artifacts)
        registry = self.ctx.session.registry("targets")
        target = registry.get(target_name)()
        copy = copy_graph(self.graph)
        target.lower(copy, LoweringContext(plan, self.layer_map, {}, self.ctx.logger))
        write_model(copy, path)

    def evaluate(self, key: str, make_model) -> float:
        """The evaluator's metric for trial ``key`` (remembered; the model is built only when needed)."""
        from ..algorithms.autocal import check_metric
        memo = self.state["evaluations"]
        if key not in memo:
            path = self.workdir / "trial_model.onnx"
            make_model(path)
            metric = check_metric(_call(self.evaluator, "evaluate", str(path)),
                                  f"{WHERE}: evaluator '{type(self.evaluator).__name__}'.evaluate")
            memo[key] = metric
            self._save_state()
        return float(memo[key])

    def verdict(self, original: float, metric: float) -> tuple[bool, float]:
        from ..algorithms.autocal import check_verdict
        return check_verdict(_call(self.evaluator, "metric_eval", original, metric),
                             f"{WHERE}: evaluator '{type(self.evaluator).__name__}'.metric_eval")

    def run(self) -> dict[str, Any]:
        from ..algorithms.autocal import binary_search
        from ..ir.io import write_model
        float_graph = float_reference(self.graph, self.ctx)      # bias correction / retraining undone
        original = self.evaluate("float", lambda path: write_model(_plain_copy(float_graph), path))
        ok, _ = self.verdict(original, original)
        if not ok:
            raise ConfigError(f"{WHERE}: metric_eval(original, original) is not acceptable for original metric "
                              f"{original}; metric_eval must accept the float model's own metric")

        def satisfied(count: int) -> bool:
            changed = self.ranking[:count]
            config = self.config(changed)
            metric = self.evaluate(json.dumps(["fakequant", self.options.strategy, changed]),
                                   lambda path: self.lower(config, "fakequant", path))
            accepted, loss = self.verdict(original, metric)
            self.trials.append({"changed": changed, "metric": metric, "loss": loss, "satisfied": accepted,
                                "bitops": self.bitops(config)})
            if accepted and (self.state["best"] is None or count < len(self.state["best"]["changed"])):
                self.state["best"] = {"changed": changed, "metric": metric}
                self._save_state()
            return accepted

        limit, reason = self._limit()
        found = 0 if satisfied(0) else (binary_search(limit, satisfied) if limit else None)
        if found is None:
            raise ConfigError(f"{WHERE}: no configuration meets the evaluator's metric ({reason}; original metric "
                              f"{original}, {len(self.trials)} tried); nothing was saved")
        changed = self.ranking[:found]
        config = self.config(changed)
        acts, wts = self.factors(config)
        metric = next(t["metric"] for t in self.trials if t["changed"] == changed)
        record = {"strategy": self.options.strategy, "sensitivity": self.options.sensitivity,
                  "original_metric": original, "global_metric": self.trials[0]["metric"],
                  "bitops_asked": self.bitops(self.asked), "trials": self.trials,
                  "evaluations": len(self.state["evaluations"]), "resumed_evaluations": self.state["resumed"],
                  "result": {"layers": changed, "metric": metric, "bitops": self.bitops(config),
                             "precision": {n: config[n].text() for n in changed if n in config}}}
        return {"config": config, "act_quant": acts, "weight_quant": wts, "record": record}

    def _limit(self) -> tuple[int, str]:
        """Longest prefix the strategy may change, and why no longer."""
        n = len(self.ranking)
        if self.options.strategy == "BinarySearch":
            return n - 1, f"even {n - 1} of {n} layers rolled back to float do not"
        budget = self.options.bitops_budget * self.bitops(self.asked)
        limit = 0
        for count in range(1, n + 1):
            if self.config(self.ranking[:count]) == self.config(self.ranking[:count - 1]):
                limit = count        # nothing to raise in this layer: free
                continue
            if self.bitops(self.config(self.ranking[:count])) > budget:
                break
            limit = count
        return limit, (f"raising the {limit} most sensitive layers is the most bitops_budget "
                       f"{self.options.bitops_budget} allows")

    # -- outputs
    def write(self, outcome) -> list[str]:
        from ..amct import create_quant_config
        ctx, files = self.ctx, []
        config = outcome["config"]
        quant_config = create_quant_config([(layer.name, layer.op_type) for layer in self.layer_map.layers()],
                                           skip_layers=[n for n in self.layer_map if n not in config])
        for name, precision in config.items():
            entry = quant_config.get(name)
            if isinstance(entry, dict):
                for key, bits in (("activation_quant_params", precision.act), ("weight_quant_params", precision.wts)):
                    if isinstance(entry.get(key), dict) and bits:
                        entry[key]["num_bits"] = bits
        for kind, data in (("config", quant_config), ("ranking", self.ranking_information()),
                           ("record", outcome["record"])):
            ctx.output_path(FILES[kind]).write_text(json_text(data) if kind != "config" else
                                                    json.dumps(data, indent=4, separators=(",", ":")) + "\n")
            files.append(FILES[kind])
        prefix = ctx.file_name(self.options.prefix, "prefix", fragment=True)
        registry = ctx.session.registry("targets")
        for name in self.options.targets:
            suffix = registry.get(name).file_suffix()
            filename = f"{prefix}_{suffix}.onnx" if prefix else f"{suffix}.onnx"
            self.lower(config, name, ctx.output_path(filename))
            files.append(filename)
        return files

    def finish(self) -> None:
        """The run succeeded: its memo is no longer needed."""
        shutil.rmtree(self.workdir, ignore_errors=True)

    def close(self) -> None:
        if self.owned:
            shutil.rmtree(self.workdir, ignore_errors=True)


def _plain_copy(graph):
    from ..ir.edit import copy_graph
    return copy_graph(graph)


def _report(record: Mapping[str, Any]) -> str:
    result = record["result"]
    verb = "rolled back to float" if record["strategy"] == "BinarySearch" else "raised"
    lines = [f"auto_calibrate ({record['strategy']}, {record['sensitivity']}): original metric "
             f"{record['original_metric']:.6g}, all quantized {record['global_metric']:.6g}, final {result['metric']:.6g}",
             f"{len(result['layers'])} layer(s) {verb}: {', '.join(result['layers']) or 'none'}; "
             f"bitops {result['bitops'] / max(record['bitops_asked'], 1):.3f}x of the configuration asked; "
             f"{record['evaluations']} evaluations ({record['resumed_evaluations']} re-used from an interrupted run)"]
    return "\n".join(lines)
