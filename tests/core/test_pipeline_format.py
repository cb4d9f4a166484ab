"""Pipeline files: three formats into one schema, textual round trip, located problems."""
import json

import pytest

from amct_pipeline.errors import ConfigError
from amct_pipeline.pipeline import format_pipeline, load_pipeline, parse_pipeline_text
from amct_pipeline.pipeline.textual import TextSyntaxError

YAML = """\
schema_version: 1
name: t
datasets:
  calib: {reader: npy, path: data.npy, batch_size: 4}
passes:
  - pass: fuse_bn
  - pass: match_layers
    options: {skip_layers: [fc], overrides: [{match: {op_type: Gemm}, skip: true}]}
  - pass: save
"""
TOML = """\
schema_version = 1
name = "t"
[datasets.calib]
reader = "npy"
path = "data.npy"
batch_size = 4
[[passes]]
pass = "fuse_bn"
[[passes]]
pass = "match_layers"
[passes.options]
skip_layers = ["fc"]
overrides = [{match = {op_type = "Gemm"}, skip = true}]
[[passes]]
pass = "save"
"""


def test_yaml_json_toml_load_into_one_schema(tmp_path):
    (tmp_path / "p.yaml").write_text(YAML)
    (tmp_path / "p.toml").write_text(TOML)
    from_yaml = load_pipeline(tmp_path / "p.yaml")
    (tmp_path / "p.json").write_text(json.dumps(from_yaml.to_dict()))
    specs = [load_pipeline(tmp_path / f"p.{ext}") for ext in ("yaml", "json", "toml")]
    dumps = [s.to_dict() for s in specs]
    assert dumps[0] == dumps[1] == dumps[2]
    assert specs[0].datasets["calib"].batch_size == 4
    assert [p.name for p in specs[2].passes] == ["fuse_bn", "match_layers", "save"]


@pytest.mark.parametrize("text", [
    "fuse_bn,match_layers{skip_layers=[fc]},save",
    'calibrate{algorithm=ifmr algorithm_options={max_percentile=0.999999 search_range=[0.7,1.3]}},save{filename="a b.onnx"}',
    'x{flag=true none=null n=-3 f=1e-05 s="123" empty="" nested={a=[1,[2,3]] b={c=d}}}',
])
def test_textual_form_prints_back_unchanged(text):
    assert format_pipeline(parse_pipeline_text(text)) == text


def test_textual_values_are_typed():
    (step,) = parse_pipeline_text('p{a=1 b=2.5 c=true d=[x,"1"] e=null}')
    assert step["options"] == {"a": 1, "b": 2.5, "c": True, "d": ["x", "1"], "e": None}


def test_file_to_text_and_back_is_the_same_pipeline(tmp_path):
    (tmp_path / "p.yaml").write_text(YAML)
    spec = load_pipeline(tmp_path / "p.yaml")
    text = format_pipeline(spec.passes)
    again = load_pipeline(text)
    assert [(p.name, p.options) for p in again.passes] == [(p.name, p.options) for p in spec.passes]


@pytest.mark.parametrize("bad", ["fuse_bn{", "a{b}", "a,,b", 'a{b="x}'])
def test_textual_syntax_errors_name_the_column(bad):
    with pytest.raises((ConfigError, TextSyntaxError), match="column"):
        load_pipeline(bad)


def test_schema_problems_are_all_collected_with_key_paths(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("schema_version: 1\nnmae: x\ndatasets:\n  c: {bacth_size: 2}\npasses:\n  - pass: fuse_bn\n    optoins: {}\n")
    with pytest.raises(ConfigError) as info:
        load_pipeline(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 3
    assert f"{path}: nmae: unknown key; did you mean 'name'?" in lines
    assert any("datasets.c.bacth_size" in line and "'batch_size'" in line for line in lines)
    assert any("passes[0].optoins" in line and "'options'" in line for line in lines)


def test_unsupported_schema_version(tmp_path):
    with pytest.raises(ConfigError, match="schema_version"):
        load_pipeline({"schema_version": 7, "passes": []})


@pytest.mark.parametrize("content, message", [
    ("", "empty"),
    ("passes: [\n", "not valid YAML"),
    ("- a\n- b\n", "top level must be a mapping"),
])
def test_unreadable_files(tmp_path, content, message):
    path = tmp_path / "p.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_pipeline(path)


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_pipeline(tmp_path / "nope.yaml")


def test_overrides_address_passes_by_name_and_index():
    spec = load_pipeline({"passes": [{"pass": "fuse_bn"}, {"pass": "save"}]},
                         overrides=["passes.save.options.filename=x.onnx", "passes[0].options.do_fusion=false",
                                    "context.seed=3"])
    assert spec.passes[1].options == {"filename": "x.onnx"}
    assert spec.passes[0].options == {"do_fusion": False}
    assert spec.context.seed == 3


def test_override_of_unknown_pass_suggests():
    with pytest.raises(ConfigError, match="did you mean 'fuse_bn'"):
        load_pipeline({"passes": [{"pass": "fuse_bn"}]}, overrides=["passes.fuse_b.options.x=1"])
