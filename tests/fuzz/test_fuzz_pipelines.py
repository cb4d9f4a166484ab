"""Fuzz pipelines: the textual form, YAML/JSON/TOML files, --set overrides and option values."""
from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from amct_pipeline.demo import build_demo_model
from amct_pipeline.session import Session
from fuzz_helpers import COUNTS, Sandbox, fuzz_settings, planned, run_cli

SESSION = Session(load_entrypoints=False)
PASSES = SESSION.registry("passes").names()
OPTION_NAMES = {name: list(SESSION.lookup("passes", name).Options.model_fields) for name in PASSES}
ALGORITHMS = [n for kind in ("calibrators", "weight_quantizers", "decompositions", "targets") for n in
              SESSION.registry(kind).names()]
CHEAP = ["fuse_bn", "match_layers", "save"]       # passes a case may run on the demo model

# -- values ------------------------------------------------------------------------------------------
NAMES = st.one_of(st.sampled_from(PASSES + ALGORITHMS + ["calib", "x", "conv1", "fc", "Conv", "model"]),
                  st.text(st.characters(codec="utf-8"), max_size=12))
PATHS = st.sampled_from([
    "out.onnx", "{model}_x.onnx", "../escape.onnx", "../../elsewhere/x.onnx", "/tmp/amct-fuzz-abs.onnx",
    "sub/dir/x.onnx", "{model:>400000000}", "{0}", "{x}", "{model.__class__}", "{model!r}", "{{model}}", "{",
    "}", "", ".", "..", "/", "a\x00b", "x" * 300, "/dev/zero", "/proc/self/environ", "record.txt",
    "../inputs/m.onnx", "m.onnx", "%s", "con", "~/x", "a:b", " spaced name .onnx"])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64), st.floats(allow_nan=True),
                    st.floats(-1e3, 1e3), st.sampled_from([0, 1, -1, 2e-9, 1e300, 65536, 10**9]), NAMES, PATHS)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(NAMES, inner, max_size=4)), max_leaves=12)


@st.composite
def pass_specs(draw, names=PASSES):
    name = draw(st.one_of(st.sampled_from(names), NAMES))
    known = OPTION_NAMES.get(name, [])
    keys = st.one_of(st.sampled_from(known), NAMES) if known else NAMES
    options = draw(st.dictionaries(keys, VALUES, max_size=3))
    return {"pass": name, "options": options} if options or draw(st.booleans()) else {"pass": name}


@st.composite
def pipelines(draw):
    data = {"passes": draw(st.lists(pass_specs(), min_size=0, max_size=4))}
    if draw(st.booleans()):
        data["datasets"] = draw(st.dictionaries(NAMES, st.one_of(
            st.fixed_dictionaries({}, optional={"reader": st.sampled_from(["npy", "python", "nope"]), "path": PATHS,
                                                "batch_size": SCALARS, "num_batches": SCALARS, "start": SCALARS,
                                                "count": SCALARS, "key": NAMES, "preprocess": VALUES}),
            VALUES), max_size=2))
    for key in ("schema_version", "name", "context", "model", "description"):
        if draw(st.integers(0, 5)) == 0:
            data[key] = draw(VALUES)
    if draw(st.integers(0, 6)) == 0:
        data[draw(NAMES)] = draw(VALUES)
    return data


def mutate_text(draw, text: str) -> str:
    """A few character-level edits: delete, duplicate, insert syntax characters."""
    alphabet = st.sampled_from(list("{}[]=,\"' :\n-&*!|>#%@`\\\t") + ["&a ", "*a", "!!python/name:os.system ",
                                                                       "<<: *a", "\udcff", "\x00", "\u2028"])
    for _ in range(draw(st.integers(0, 4))):
        if not text:
            text = draw(alphabet)
            continue
        i = draw(st.integers(0, len(text)))
        action = draw(st.integers(0, 2))
        if action == 0:
            text = text[:i] + text[i + 1:]
        elif action == 1:
            j = min(len(text), i + draw(st.integers(1, 20)))
            text = text[:j] + text[i:j] + text[j:]
        else:
            text = text[:i] + draw(alphabet) + text[i:]
    return text


@pytest.fixture
def sandbox(tmp_path):
    box = Sandbox(tmp_path)
    box.write("m.onnx", build_demo_model().SerializeToString())
    return box


def _textual(data) -> str:
    from amct_pipeline.pipeline.textual import format_pipeline
    passes = [p for p in data["passes"] if isinstance(p.get("pass"), str)] or [{"pass": "fuse_bn"}]
    return format_pipeline([{"pass": p["pass"], "options": p.get("options") or {}} for p in passes])


def test_fuzz_textual_form(sandbox):
    @fuzz_settings("text")
    @given(st.data())
    def case(data):
        spec = data.draw(pipelines())
        text = _textual(spec) if data.draw(st.booleans()) else mutate_text(data.draw, _textual(spec))
        command = data.draw(st.sampled_from(["print-pipeline", "print-pipeline", "validate"]))
        code, out, _ = run_cli(sandbox, [command, "--", text], "text")
        if code == 0 and command == "print-pipeline":          # printing is canonical: it parses back
            printed = out.strip()
            again, out2, err2 = run_cli(sandbox, ["print-pipeline", "--", printed], "text")
            assert again == 0 and out2.strip() == printed, (text, printed, err2)
    case()
    assert COUNTS["text"] >= planned("text")


def _serialize(data, kind: str, draw) -> str:
    if kind == "json":
        return json.dumps(data, allow_nan=True, ensure_ascii=draw(st.booleans()))
    if kind == "toml":
        return _toml(data)
    return yaml.safe_dump(data, allow_unicode=True, default_flow_style=draw(st.sampled_from([None, True, False])))


def _toml(data) -> str:
    """A tiny TOML writer for what pipelines() draws (inline tables; unrepresentable values become strings)."""
    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v) if -2**63 <= v < 2**63 else json.dumps(str(v))
        if isinstance(v, float):
            return "nan" if v != v else ("inf" if v == float("inf") else "-inf" if v == -float("inf") else repr(v))
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v if x is not None) + "]"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{json.dumps(str(k))} = {value(x)}" for k, x in v.items() if x is not None) + "}"
        return json.dumps(str(v))
    return "\n".join(f"{json.dumps(str(k))} = {value(v)}" for k, v in data.items() if v is not None) + "\n"


def test_fuzz_pipeline_files(sandbox):
    @fuzz_settings("files")
    @given(st.data())
    def case(data):
        kind = data.draw(st.sampled_from(["yaml", "yaml", "json", "toml"]))
        text = _serialize(data.draw(pipelines()), kind, data.draw)
        if data.draw(st.booleans()):
            text = mutate_text(data.draw, text)
        raw = text.encode("utf-8", "surrogatepass")
        if data.draw(st.integers(0, 9)) == 0:
            raw = raw.replace(b"a", b"\xe9", 1)
        path = sandbox.write(f"p.{'yml' if kind == 'yaml' and data.draw(st.booleans()) else kind}", raw)
        command = data.draw(st.sampled_from(["validate", "print-pipeline"]))
        run_cli(sandbox, [command, path], "files")
    case()
    assert COUNTS["files"] >= planned("files")


KEY_PARTS = st.one_of(st.sampled_from(["passes", "options", "datasets", "name", "context", "model", "calib", "save",
                                       "fuse_bn", "match_layers", "filename", "skip_layers", "overrides", "[0]",
                                       "[1]", "[99999999999999999999]", "[-1]", "seed", "verify_each", "path"]), NAMES)
SET_VALUES = st.one_of(st.sampled_from(["!!python/object/apply:os.system [id]", "&a [*a]", "*a", "[1, 2", "{a: 1}",
                                        "!!binary aGk=", "~", "null", "1e999", ".nan", "- a\n- b", "'x'", "\"\\x00\"",
                                        "!!set {a}", "2024-01-01", "0x1F", "<<: {a: 1}", "|\n  block"]),
                       st.text(st.characters(codec="utf-8", exclude_characters="\x00"), max_size=20),
                       VALUES.map(lambda v: json.dumps(v, allow_nan=True)))


def test_fuzz_set_overrides(sandbox):
    @fuzz_settings("set")
    @given(st.lists(st.tuples(st.lists(KEY_PARTS, min_size=1, max_size=5), SET_VALUES), min_size=1, max_size=3),
           st.sampled_from(["fuse_bn,match_layers,save", "ptq_int8", "demo"]))
    def case(items, pipeline):
        argv = ["validate", pipeline]
        for parts, value in items:
            key = "".join(p if p.startswith("[") else ("." + p if i else p) for i, p in enumerate(parts))
            argv += ["--set", f"{key}={value}"]
        run_cli(sandbox, argv, "set")
    case()
    assert COUNTS["set"] >= planned("set")


def test_fuzz_option_values_validate_and_run(sandbox):
    @fuzz_settings("options")
    @given(st.data())
    def case(data):
        run_it = data.draw(st.booleans())
        passes = data.draw(st.lists(pass_specs(CHEAP if run_it else PASSES), min_size=1, max_size=3))
        for spec in passes:
            options = spec.setdefault("options", {})
            for name in OPTION_NAMES.get(spec["pass"], []):
                if name in ("filename", "record", "quant_config", "prefix", "amct_config", "info_file", "report_file",
                            "plot", "path") and data.draw(st.integers(0, 2)) == 0:
                    options[name] = data.draw(PATHS)
        path = sandbox.write("p.json", json.dumps({"passes": passes}, allow_nan=True))
        if run_it:
            run_cli(sandbox, ["run", path, "--model", sandbox.inputs / "m.onnx", "-o", sandbox.out, "-q"], "options")
        else:
            run_cli(sandbox, ["validate", path], "options")
    case()
    assert COUNTS["options"] >= planned("options")


def test_the_sandbox_catches_what_the_suite_looks_for(sandbox, monkeypatch):
    """Control: a 'CLI' that writes outside the output folder, edits an input or fails internally is caught."""
    import amct_pipeline.cli.main as cli

    def writes_outside(argv):
        (sandbox.cwd / "stray.txt").write_text("x")
        return 0

    def edits_input(argv):
        (sandbox.inputs / "m.onnx").write_bytes(b"changed")
        return 0

    def internal(argv):
        print("amct-pipeline: error: internal error: KeyError: 1", file=__import__("sys").stderr)
        return 3

    def two_lines(argv):
        print("Traceback (most recent call last):", file=__import__("sys").stderr)
        return 1

    def writes_output(argv):
        sandbox.out.mkdir()
        (sandbox.out / "fine.onnx").write_text("x")
        return 0

    for fake, message in ((writes_outside, "cwd/stray.txt"), (edits_input, "inputs/m.onnx"),
                          (internal, "internal error"), (two_lines, "one-line")):
        monkeypatch.setattr(cli, "main", fake)
        with pytest.raises(AssertionError, match=message):
            run_cli(sandbox, ["x"], "control")
        sandbox.write("m.onnx", build_demo_model().SerializeToString())
        for stray in sandbox.cwd.iterdir():
            stray.unlink()
    monkeypatch.setattr(cli, "main", writes_output)
    assert run_cli(sandbox, ["x"], "control")[0] == 0 and not sandbox.out.exists()
    COUNTS.pop("control", None)
