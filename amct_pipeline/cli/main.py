"""``amct-pipeline``: run, analyze, validate, list, describe, print-pipeline, schema, demo, config, verify-deploy,
amct-calibration."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from ..errors import AmctError

EXIT_ERROR, EXIT_USAGE, EXIT_INTERNAL = 1, 2, 3
KIND_ALIASES = {"quantizers": "weight_quantizers", "presets": "pipelines", "methods": "decompositions"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        with warnings.catch_warnings():
            if not args.debug:           # a warning is one line too; --debug keeps Python's file:line form
                warnings.showwarning = _show_warning
            return args.func(args) or 0
    except AmctError as exc:
        if args.debug:
            raise
        _error(str(exc))
        return EXIT_ERROR
    except BrokenPipeError:           # e.g. `amct-pipeline list | head`: the reader left, not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        _error("interrupted; nothing was written")
        return 130
    except Exception as exc:  # an unexpected failure still gets one line unless --debug
        if args.debug:
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
        return EXIT_INTERNAL


def _error(message: str) -> None:
    lines = message.strip().splitlines() or ["unknown error"]
    for line in lines:
        print(f"amct-pipeline: error: {line}", file=sys.stderr)


def _warn(message: str) -> None:
    print(f"amct-pipeline: warning: {message}", file=sys.stderr)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    _warn(" ".join(str(message).split()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="amct-pipeline", parents=[_global_options(suppress=False)],
                                     description="Compress ONNX models with declarative pipelines (AMCT-compatible).")
    # global options are accepted after the command too; SUPPRESS keeps a subcommand from
    # resetting what was given before it
    common = _global_options(suppress=True)
    sub = parser.add_subparsers(metavar="COMMAND")

    run = sub.add_parser("run", parents=[common], help="run a pipeline on a model")
    run.add_argument("pipeline", help="pipeline file (.yaml/.json/.toml), preset name or textual form")
    run.add_argument("--model", help="input .onnx model (overrides the pipeline's model.input)")
    run.add_argument("--output-dir", "-o", help="directory for the files the pipeline writes")
    run.add_argument("--data", action="append", default=[], metavar="NAME=PATH", help="bind a dataset to a file")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline value")
    run.add_argument("--no-verify", action="store_true", help="skip graph verification after passes")
    run.add_argument("--dump-ir", metavar="DIR", help="write the model after every modifying pass into DIR")
    run.add_argument("--time-passes", action="store_true", help="print a table of pass times")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress lines")
    run.set_defaults(func=cmd_run)

    analyze = sub.add_parser("analyze", parents=[common],
                             help="per-layer quantization sensitivity, output effects, FLOPs and bitops "
                                  "(<model>_sensitivity.json and a table)")
    analyze.add_argument("--model", required=True, help="input .onnx model")
    analyze.add_argument("--data", action="append", default=[], metavar="calib=PATH",
                         help="calibration data ([N, ...] float32 .npy/.npz, preprocessed)")
    analyze.add_argument("--output-dir", "-o", required=True, help="where <model>_sensitivity.json is written")
    analyze.add_argument("--max-samples", type=_positive, default=None, metavar="N",
                         help="samples the output effects are measured on (default 32)")
    analyze.add_argument("--no-output-effects", action="store_true", help="only AMCT's per-layer sensitivity")
    analyze.add_argument("--plot", action="store_true", help="also write <model>_sensitivity.png (matplotlib)")
    analyze.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a pipeline value")
    analyze.add_argument("--quiet", "-q", action="store_true", help="no progress lines and no table")
    analyze.set_defaults(func=cmd_analyze)

    validate = sub.add_parser("validate", parents=[common], help="check pipelines without loading a model")
    validate.add_argument("pipelines", nargs="+")
    validate.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    validate.set_defaults(func=cmd_validate)

    show = sub.add_parser("print-pipeline", parents=[common], help="print a pipeline in the textual form")
    show.add_argument("pipeline")
    show.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    show.set_defaults(func=cmd_print)

    lister = sub.add_parser("list", parents=[common], help="list registered passes, algorithms, readers, plugins")
    lister.add_argument("kind", nargs="?", help="passes, calibrators, weight_quantizers, decompositions, targets, "
                                                "readers, pipelines or plugins (default: all)")
    lister.set_defaults(func=cmd_list)

    describe = sub.add_parser("describe", parents=[common], help="describe a pass, algorithm or reader")
    describe.add_argument("name")
    describe.set_defaults(func=cmd_describe)

    schema = sub.add_parser("schema", parents=[common], help="print the pipeline file JSON Schema")
    schema.add_argument("--output", "-o", help="write to this file instead of stdout")
    schema.set_defaults(func=cmd_schema)

    demo = sub.add_parser("demo", parents=[common], help="build a small model and data, run the demo pipeline")
    demo.add_argument("--output-dir", "-o", default="amct-demo", help="where the demo writes (default: amct-demo)")
    demo.set_defaults(func=cmd_demo)

    config = sub.add_parser("config", parents=[common], help="create or check AMCT quant config files")
    actions = config.add_subparsers(metavar="ACTION")
    create = actions.add_parser("create", parents=[common],
                                help="write AMCT's JSON quant config listing every quantizable layer")
    create.add_argument("--model", required=True, help="input .onnx model")
    create.add_argument("--output", "-o", default="quant.json", help="config file to write (default: quant.json)")
    create.add_argument("--skip-layers", default="", metavar="A,B", help="layers written with quant_enable false")
    create.add_argument("--batch-num", type=int, default=1, metavar="N", help="AMCT batch_num (default: 1)")
    create.add_argument("--activation-offset", type=_flag, default=True, metavar="true|false",
                        help="asymmetric activations (default: true)")
    create.set_defaults(func=cmd_config_create)
    check = actions.add_parser("check", parents=[common], help="validate a .json/.cfg quant config against a model")
    check.add_argument("file", help="AMCT quant config (.json) or simplified config (.cfg)")
    check.add_argument("--model", required=True, help="the .onnx model the config is for")
    check.set_defaults(func=cmd_config_check)
    config.set_defaults(func=lambda args: config.print_help() or EXIT_USAGE)

    verify = sub.add_parser("verify-deploy", parents=[common],
                            help="run an Ascend deploy model (CPU reference) and its fake-quant model "
                                 "(onnxruntime) and compare them")
    verify.add_argument("deploy", help="the deploy model (<prefix>_deploy_model.onnx)")
    verify.add_argument("fakequant", help="the fake-quant model (<prefix>_fake_quant_model.onnx)")
    verify.add_argument("--data", action="append", required=True, metavar="[INPUT=]PATH",
                        help="samples [N, ...] as .npy (INPUT=PATH.npy per input for multi-input models) or .npz")
    verify.add_argument("--batches", type=_positive, default=None, metavar="N", help="compare at most N batches")
    verify.add_argument("--batch-size", type=_positive, default=None, metavar="B",
                        help="samples per batch (default: the model's fixed batch size, else 8)")
    verify.add_argument("--quant-convention", choices=("amct", "cann"), default=None,
                        help="AscendQuant rounding of the reference (default: the deploy model's metadata, else amct)")
    verify.add_argument("--json", action="store_true", help="print the report as JSON")
    verify.set_defaults(func=cmd_verify_deploy)
    calibration = sub.add_parser("amct-calibration", parents=[common],
                                 help="AMCT's `amct_onnx calibration`: PTQ from raw .bin batch folders")
    from ..amct_onnx.cli import add_calibration_arguments
    add_calibration_arguments(calibration)
    calibration.set_defaults(func=cmd_amct_calibration)
    return parser


def cmd_amct_calibration(args) -> int:
    from ..amct_onnx.cli import run_calibration
    for path in run_calibration(args):
        print(path)
    return 0


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _flag(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return lowered == "true"


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    def default(value):
        return argparse.SUPPRESS if suppress else value
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument("--debug", action="store_true", default=default(False), help="show tracebacks")
    options.add_argument("--no-plugins", action="store_true", default=default(False),
                         help="do not autoload entry-point plugins")
    options.add_argument("--block-plugin", action="append", default=default([]), metavar="NAME",
                         help="do not load plugin NAME")
    options.add_argument("--plugin", action="append", default=default([]), metavar="MODULE",
                         help="register a plugin module")
    return options


def _session(args):
    from ..session import Session
    plugins = [_import_plugin(name) for name in args.plugin]
    return Session(load_entrypoints=False if args.no_plugins else None, plugins=plugins, block=args.block_plugin)


def _import_plugin(name: str):
    """A ``--plugin MODULE``, imported from the installed environment (never the working directory)."""
    import importlib

    from ..errors import PluginError
    from ..plugins.discovery import without_cwd_on_path
    if not name or any(not part.isidentifier() for part in name.split(".")):
        raise PluginError(f"--plugin {name!r}: not a module name (expected e.g. mypackage.plugin)")
    try:
        with without_cwd_on_path():
            return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and (name == exc.name or name.startswith(exc.name + ".")):
            raise PluginError(f"--plugin {name}: no module '{exc.name}' is installed in this environment "
                              "(the working directory is not searched); install the plugin's distribution") from None
        raise PluginError(f"--plugin {name}: importing it failed: {_one_line(exc)}") from None
    except Exception as exc:   # a broken plugin is the plugin's bug, reported as such
        raise PluginError(f"--plugin {name}: importing it failed: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:300]}"


def _bindings(items: Sequence[str]) -> dict[str, str]:
    from ..errors import ConfigError
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--data {item}: expected NAME=PATH, e.g. --data calib=images.npy")
        out[name] = path
    return out


def cmd_run(args) -> int:
    from ..errors import ConfigError
    from ..pipeline.instruments import DumpIR, Progress, Timing
    session = _session(args)
    datasets = _bindings(args.data)
    pipeline = session.build(args.pipeline, overrides=args.set, datasets=datasets)
    from ..pipeline.usage import unused_bindings
    for message in unused_bindings(pipeline, datasets):
        _warn(message)
    model = args.model or pipeline.spec.model.input
    if not model:
        raise ConfigError("no model given; pass --model M.onnx")
    if pipeline.spec.model.input and not args.model:
        model = str(Path(pipeline.spec.base_dir) / model)
    instruments = [] if args.quiet else [Progress()]
    timing = Timing() if args.time_passes else None
    instruments += [timing] if timing else []
    if args.dump_ir:
        from ..files import relative_folder
        if not args.output_dir:
            raise ConfigError("--dump-ir DIR names a folder inside the output folder; give --output-dir too")
        instruments.append(DumpIR(relative_folder(args.output_dir, args.dump_ir, "--dump-ir")))
    result = pipeline.run(model, datasets=datasets, output_dir=args.output_dir, instruments=instruments,
                          verify_each=False if args.no_verify else None, progress=not args.quiet)
    if not args.quiet:                 # passes never print; their reports come with the result
        for _, report in result.reports:
            print(report, file=sys.stderr, flush=True)
    for path in result.files:
        print(path)
    if timing:
        print(timing.table(), file=sys.stderr)
    return 0


def cmd_analyze(args) -> int:
    """The shipped ``analyze_int8`` pipeline (fuse_bn, match_layers, calibrate, quantize_weights, analyze)."""
    overrides = []
    if args.max_samples is not None:
        overrides.append(f"passes.analyze.options.max_samples={args.max_samples}")
    if args.no_output_effects:
        overrides.append("passes.analyze.options.output_effects=false")
    if args.plot:
        overrides.append("passes.analyze.options.plot='{model}_sensitivity.png'")
    args.pipeline, args.set = "analyze_int8", overrides + list(args.set)
    args.no_verify, args.dump_ir, args.time_passes = False, None, False
    return cmd_run(args)


def cmd_validate(args) -> int:
    from ..errors import ConfigError
    session = _session(args)
    failed = 0
    for source in args.pipelines:
        try:
            pipeline = session.build(source, overrides=args.set)
        except ConfigError as exc:
            failed += 1
            _error(str(exc))
            continue
        print(f"ok: {source} ({len(pipeline.passes)} passes)")
        from ..pipeline.usage import python_datasets
        for name, target in python_datasets(pipeline):
            print(f"note: {source}: datasets.{name} uses the 'python' reader: running this pipeline imports "
                  f"'{target.partition(':')[0]}' and calls '{target}' (installed code, not data)")
        from ..pipeline.usage import imported_code
        for name, target in imported_code(pipeline):
            print(f"note: {source}: pass '{name}' imports '{target.partition(':')[0]}' and runs '{target}' "
                  "(installed code, not data)")
    return EXIT_ERROR if failed else 0


def cmd_print(args) -> int:
    print(_session(args).build(args.pipeline, overrides=args.set).text)
    return 0


def cmd_list(args) -> int:
    session = _session(args)
    kind = KIND_ALIASES.get(args.kind, args.kind)
    if kind == "plugins":
        for name, where in session.plugin_names():
            print(f"{name:24} {where}")
        return 0
    kinds = [kind] if kind else list(session.registries)
    for k in kinds:
        registry = session.registry(k)
        if len(kinds) > 1:
            print(f"{k}:")
        for entry in registry:
            summary = getattr(entry.obj, "summary", "") if k != "pipelines" else str(entry.obj)
            print(f"  {entry.name:22} {summary}")
    return 0


def cmd_describe(args) -> int:
    from ..errors import ConfigError
    from ..options import suggest
    session = _session(args)
    found = session.find(args.name)
    if not found:
        every = [n for reg in session.registries.values() for n in reg.names()]
        raise ConfigError(f"nothing is registered as '{args.name}'; {suggest(args.name, every) or 'see amct-pipeline list'}")
    for kind, entry in found:
        print(describe_entry(kind, entry))
    return 0


def describe_entry(kind: str, entry) -> str:
    obj = entry.obj
    from ..session import SINGULAR
    lines = [f"{entry.name} ({SINGULAR.get(kind, kind)})", f"  {getattr(obj, 'summary', '')}",
             f"  provided by: {entry.provider}"]
    for attr in ("requires", "produces"):
        values = sorted(getattr(obj, attr, ()) or ())
        if values:
            lines.append(f"  {attr}: {', '.join(values)}")
    options = getattr(obj, "Options", None)
    if options is not None and options.model_fields:
        lines.append("  options:")
        for name, field in options.model_fields.items():
            default = "(required)" if field.is_required() else repr(field.get_default(call_default_factory=True))
            lines.append(f"    {field.alias or name} = {default}  {field.description or ''}".rstrip())
    return "\n".join(lines)


def cmd_schema(args) -> int:
    from ..pipeline.schema import pipeline_json_schema
    text = json.dumps(pipeline_json_schema(_session(args)), indent=2, sort_keys=True)
    if args.output:
        from ..ir.io import atomic_path
        with atomic_path(Path(args.output)) as tmp:
            tmp.write_text(text + "\n")
    else:
        print(text)
    return 0


def _config_layers(session, model: str):
    """The model's quantizable layers as AMCT lists them: after BN fusion, in graph order."""
    result = session.build("fuse_bn,match_layers").run(model)
    return result.artifacts["layer_map"]


def _unwrap(exc):
    """A pass's ConfigError without the 'passes[i] failed' frame: the file's problems, one per line."""
    from ..errors import ConfigError
    cause = exc.__cause__
    return cause if isinstance(cause, ConfigError) else exc


_CREATE_FLAGS = {"skip_layers": "--skip-layers", "batch_num": "--batch-num", "activation_offset": "--activation-offset",
                 "layers": "--model"}


def cmd_config_create(args) -> int:
    from ..amct import ConfigFileError, create_quant_config, write_quant_config
    from ..errors import ConfigError, Problem
    from ..files import OutputError, describe_os_error
    _check_config_output(Path(args.output), args.model)
    layer_map = _config_layers(_session(args), args.model)
    skip = [name.strip() for name in args.skip_layers.split(",") if name.strip()]
    try:
        data = create_quant_config([(layer.name, layer.op_type) for layer in layer_map.layers()],
                                   skip_layers=skip, batch_num=args.batch_num,
                                   activation_offset=args.activation_offset)
        write_quant_config(data, args.output)
    except ConfigFileError as exc:   # name the command-line flags, not the API's arguments
        raise ConfigError([Problem("config create", _CREATE_FLAGS.get(i.where.split("[")[0], i.where), i.message)
                           for i in exc.issues]) from None
    except OSError as exc:
        raise OutputError(f"config create: --output {args.output}: cannot write ({describe_os_error(exc)})") from None
    print(args.output)
    print(f"{len(layer_map)} quantizable layers ({len(skip)} skipped), batch_num {args.batch_num}, "
          f"activation_offset {str(args.activation_offset).lower()}", file=sys.stderr)
    return 0


def _check_config_output(output: Path, model: str) -> None:
    """Before any work: the folder exists, the file is not a folder, and not the model or its data."""
    from ..errors import ConfigError
    from ..files import file_kind, input_keys
    from ..ir.external import checked_location, is_external
    from ..ir.io import read_model
    folder = output.parent if str(output.parent) else Path(".")
    if not folder.is_dir():
        what = "does not exist" if not folder.exists() else f"is a {file_kind(folder.stat().st_mode)}, not a folder"
        raise ConfigError(f"config create: --output {output}: the folder {folder} {what}; create it first")
    if output.is_dir():
        raise ConfigError(f"config create: --output {output} is a folder; give a file name such as quant.json")
    inputs = input_keys(model)
    if os.path.exists(model):
        for tensor in read_model(Path(model)).graph.initializer:
            if is_external(tensor):
                inputs |= input_keys(checked_location(tensor, Path(model).parent, f"{model}: '{tensor.name}'")[0])
    if input_keys(output) & inputs:
        raise ConfigError(f"config create: --output {output} is the model or one of its data files; "
                          "writing it would destroy an input; choose another file name")


def cmd_config_check(args) -> int:
    from ..errors import PassError
    session = _session(args)
    pipeline = session.pipeline([session.make_pass("fuse_bn", amct_config=args.file),
                                 session.make_pass("match_layers", amct_config=args.file)])
    try:
        result = pipeline.run(args.model)
    except PassError as exc:
        raise _unwrap(exc) from None
    layer_map, config = result.artifacts["layer_map"], result.artifacts["amct_config"]
    print(f"ok: {args.file}: {len(layer_map)} layers quantized, {len(layer_map.skipped)} skipped, "
          f"batch_num {config.batch_num}, do_fusion {str(config.do_fusion).lower()}")
    return 0


def cmd_verify_deploy(args) -> int:
    """Exit 0 when every output of the deploy model is within one quantization step of the fake-quant
    model's, 1 otherwise (the report is printed either way)."""
    from ..ascend.verify import fixed_batch, load_model, npy_batches, verify_deploy
    deploy, _ = load_model(args.deploy, "deploy")
    initializers = {t.name for t in deploy.graph.initializer}
    inputs = [i.name for i in deploy.graph.input if i.name not in initializers]
    sources = {}
    for item in args.data:
        name, sep, path = item.partition("=")
        key, path = (name, path) if sep and not Path(item).is_file() else ("", item)
        if key in sources:
            from ..errors import ConfigError
            raise ConfigError(f"--data given twice for {repr(key) if key else 'the model input'}")
        sources[key] = path
    fixed = fixed_batch(deploy, inputs)
    batch_size = args.batch_size or fixed or 8
    if fixed and batch_size % fixed:
        from ..errors import ConfigError
        raise ConfigError(f"--batch-size {batch_size} is not a multiple of the model's fixed batch size {fixed}")
    feeds = npy_batches(sources, inputs, batch_size, args.batches, multiple_of=fixed)
    report = verify_deploy(args.deploy, args.fakequant, feeds, quant_convention=args.quant_convention)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format())
    return 0 if report.ok else EXIT_ERROR


def cmd_demo(args) -> int:
    from ..demo import run_demo
    return run_demo(_session(args), Path(args.output_dir))


if __name__ == "__main__":
    sys.exit(main())
