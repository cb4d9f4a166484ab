"""Parsing limits: YAML aliases cannot multiply a document, duplicate keys and deep nesting are located
errors in YAML/JSON/TOML files and the textual form, non-UTF-8 text and YAML tags in --set are one line."""
import time

import pytest

from amct_pipeline.cli.main import main
from amct_pipeline.errors import ConfigError
from amct_pipeline.pipeline.loader import load_pipeline
from amct_pipeline.safeparse import MAX_DEPTH, ParseError, load_json, load_toml, load_yaml

LAUGHS = "\n".join(
    [f'a: &a [{",".join(["lol"] * 9)}]'] +
    [f"{b}: &{b} [{','.join(['*' + a] * 9)}]" for a, b in zip("abcdefgh", "bcdefghi")] +
    ["passes:", "  - pass: match_layers", "    options:",
     "      overrides: [{match: {name: x}, options: {calibrate: *i}}]", ""])


def one_error(capsys, argv):
    """Run the CLI in-process; return its stderr, which must be exactly one error line (exit 1)."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("amct-pipeline: error: "), err
    assert "internal error" not in err[0] and "Traceback" not in err[0]
    return err[0]


def test_billion_laughs_under_match_layers_overrides_fails_fast(tmp_path, capsys):
    path = tmp_path / "laughs.yaml"
    path.write_text(LAUGHS)
    assert len(LAUGHS) < 1024
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases expand the document"):
        load_pipeline(path)
    assert time.perf_counter() - start < 0.5
    line = one_error(capsys, ["validate", str(path)])
    assert f"{path}: line " in line and "aliases expand the document" in line


def test_modest_aliases_still_load():
    data = load_yaml("base: &b {algorithm: hfmg}\nx: *b\ny: {<<: *b, extra: 1}\n")
    assert data["x"] == {"algorithm": "hfmg"} and data["y"] == {"algorithm": "hfmg", "extra": 1}


def test_recursive_alias_is_refused():
    with pytest.raises(ParseError, match="recursive"):
        load_yaml("a: &a [1, *a]\n")


@pytest.mark.parametrize("suffix,text,line", [
    (".yaml", "passes:\n  - pass: fuse_bn\n    options: {}\n    options: {}\n", 4),
    (".yaml", "name: a\npasses: []\nname: b\n", 3),
    (".json", '{"passes": [{"pass": "fuse_bn",\n "pass": "save"}]}', 2),
    (".toml", '[[passes]]\npass = "fuse_bn"\npass = "save"\n', 3),
])
def test_duplicate_keys_are_located_errors(tmp_path, capsys, suffix, text, line):
    path = tmp_path / f"dup{suffix}"
    path.write_text(text)
    message = one_error(capsys, ["validate", str(path)])
    assert f"{path}: line {line}, column" in message
    assert "duplicate key" in message or "Cannot overwrite" in message


def test_duplicate_key_names_the_key_and_first_line():
    with pytest.raises(ParseError) as info:
        load_yaml("a: 1\nb: 2\na: 3\n")
    assert info.value.line == 3 and "duplicate key 'a' (first at line 1)" in info.value.message
    with pytest.raises(ParseError, match="duplicate key 'k'"):
        load_json('{"x": {"k": 1, "\\u006b": 2}}')


def test_non_utf8_yaml_is_one_line(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("passes:\n  - pass: fuse_bn  # caf\u00e9\n".encode("latin-1"))
    message = one_error(capsys, ["validate", str(path)])
    assert "line 2" in message and "not UTF-8" in message and "0xe9" in message


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "a: " + "[" * 5000 + "]" * 5000 + "\n"),
    (".yaml", "passes:\n" + "".join(f"{'  ' * i}- " + "\n" for i in range(150)) + "\n"),
    (".json", '{"a": ' + "[" * 5000 + "]" * 5000 + "}"),
    (".toml", "a = " + "[" * 5000 + "]" * 5000 + "\n"),
    (".toml", "a = " + "[" * 150 + "]" * 150 + "\n"),
])
def test_deep_nesting_in_files_is_a_located_error(tmp_path, capsys, suffix, text):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    message = one_error(capsys, ["validate", str(path)])
    assert str(path) in message and "nested" in message and str(MAX_DEPTH) in message


def test_deep_alias_chain_counts_as_nesting():
    text = "a0: &a0 [1]\n" + "".join(f"a{i}: &a{i} [*a{i - 1}]\n" for i in range(1, 150))
    with pytest.raises(ParseError, match="through aliases"):
        load_yaml(text)


def test_deep_textual_form_is_a_located_error_not_recursion(capsys):
    text = "fuse_bn{a=" + "[" * 20000 + "]" * 20000 + "}"
    message = one_error(capsys, ["print-pipeline", text])
    assert "<text>: nested more than" in message and "at column" in message
    assert len(message) < 400                    # the text is shortened, not echoed whole


def test_textual_form_duplicate_option_is_an_error(capsys):
    message = one_error(capsys, ["print-pipeline", "fuse_bn{skip_fusion_layers=[a] skip_fusion_layers=[b]}"])
    assert "duplicate key 'skip_fusion_layers'" in message and "column" in message


@pytest.mark.parametrize("value", ["!!python/object/apply:os.system [echo hi]", "!!str 5", "!!binary aGk=",
                                   "[1, !!python/name:os.system ]"])
def test_yaml_tag_in_set_is_an_error(capsys, value):
    message = one_error(capsys, ["print-pipeline", "fuse_bn,save", "--set", f"passes.save.options.filename={value}"])
    assert "--set: passes.save.options.filename=" in message and "YAML tag" in message


def test_bad_yaml_in_set_and_non_mapping_targets_are_errors(capsys):
    assert "not a plain YAML value" in one_error(capsys, ["print-pipeline", "fuse_bn", "--set", "name=[1,"])
    assert "is not a mapping" in one_error(capsys, ["print-pipeline", "fuse_bn", "--set", "name.x=1"])


def test_python_tags_in_files_are_refused(tmp_path):
    path = tmp_path / "tag.yaml"
    path.write_text("passes:\n  - pass: !!python/name:os.system fuse_bn\n  - {pass: save, options: !!set {a}}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    assert "line 2" in str(info.value) and "YAML tag" in str(info.value)


def test_valid_files_load_as_before(tmp_path):
    for suffix, text in ((".yaml", "name: n\npasses:\n  - pass: fuse_bn\n  - {pass: save, options: {filename: a.onnx}}\n"),
                         (".json", '{"name": "n", "passes": [{"pass": "fuse_bn"}, '
                                   '{"pass": "save", "options": {"filename": "a.onnx"}}]}'),
                         (".toml", 'name = "n"\n[[passes]]\npass = "fuse_bn"\n[[passes]]\npass = "save"\n'
                                   '[passes.options]\nfilename = "a.onnx"\n')):
        path = tmp_path / f"p{suffix}"
        path.write_text(text)
        spec = load_pipeline(path)
        assert spec.name == "n" and [p.name for p in spec.passes] == ["fuse_bn", "save"]
        assert spec.passes[1].options == {"filename": "a.onnx"}
    assert load_toml('a = [[1, 2], {b = "x"}]\n') == {"a": [[1, 2], {"b": "x"}]}
