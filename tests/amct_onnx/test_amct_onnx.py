"""amct_pipeline.amct_onnx: AMCT's scripts run with one import changed and give the pipeline's files."""
from __future__ import annotations

import filecmp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

import amct_pipeline.amct_onnx as amct
from amct_pipeline.errors import AmctError, CalibrationError
from amct_pipeline.passes.base import PIPELINE_METADATA_KEY
from amct_pipeline.session import Session

HERE = Path(__file__).parent
SAMPLES = HERE / "samples"
ASCEND = {"ascend": {"domain": "", "quant_convention": "amct"}}


# -- helpers ---------------------------------------------------------------------------------------
def _demo(tmp_path, count=48):
    from amct_pipeline.demo import build_demo_data, build_demo_model
    model = tmp_path / "demo.onnx"
    onnx.save(build_demo_model(), str(model))
    return model, build_demo_data(count)


def _model_bytes(path) -> bytes:
    """The model without the pipeline-text stamp (the two runs' pipelines are spelled differently)."""
    model = onnx.load(str(path))
    kept = [(p.key, p.value) for p in model.metadata_props if p.key != PIPELINE_METADATA_KEY]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString(deterministic=True)


def _ptq_pipeline(session, config, prefix, batch_num=None):
    """The pipeline the AMCT calls amount to: AMCT's PTQ (IFMR + ARQ) to the fake-quant and deploy models."""
    calibrate = {"algorithm": "ifmr"} | ({"batch_num": batch_num} if batch_num else {})
    return session.pipeline([
        session.make_pass("fuse_bn", amct_config=str(config)), session.make_pass("match_layers", amct_config=str(config)),
        session.make_pass("calibrate", **calibrate), session.make_pass("quantize_weights", algorithm="arq"),
        session.make_pass("lower", targets=["fakequant", "ascend"], prefix=prefix, target_options=ASCEND),
        session.make_pass("export_amct", quant_config=None)])


def _feeds(data, batch_size, count):
    return [{"input": data[i * batch_size:(i + 1) * batch_size]} for i in range(count)]


def _calibrate(model, data, out, batch_num=2, batches=None, batch_size=16):
    """create_quant_config -> quantize_model -> the user's loop (``batches`` runs) with AMCT_SO."""
    from amct_pipeline.runtime.ort import open_session
    config, record, modified = out / "config.json", out / "record.txt", out / "modified.onnx"
    amct.create_quant_config(str(config), str(model), batch_num=batch_num)
    amct.quantize_model(str(config), str(model), str(modified), str(record))
    session = open_session(modified, amct.AMCT_SO)   # what ort.InferenceSession(modified, amct.AMCT_SO) does
    for feed in _feeds(data, batch_size, batch_num if batches is None else batches):
        session.run(None, feed)
    return config, record, modified


def _run_sample(name, *args):
    done = subprocess.run([sys.executable, str(SAMPLES / name), *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# -- AMCT's samples, one import changed ---------------------------------------------------------------
def test_resnet_sample_gives_the_pipelines_record_and_models(tmp_path):
    from conftest import shared_path
    model = shared_path("models/resnet8_cifar10_bn.onnx")
    images = np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"][:32]
    data = tmp_path / "images.npy"
    np.save(data, images.astype(np.float32))
    out = _run_sample("resnet_calibration.py", model, data, tmp_path / "amct", 2, 16)
    agreement = float(out.split("agreement fake-quant vs float:")[1])
    assert agreement >= 0.8, out                    # the fake-quant model runs and is close to the float one
    amct_dir = tmp_path / "amct"
    ref = _ptq_pipeline(Session(load_entrypoints=False), amct_dir / "tmp" / "config.json", "resnet").run(
        str(model), datasets={"calib": [{"input": x} for x in np.load(data).reshape(2, 16, 3, 32, 32)]},
        output_dir=tmp_path / "ref")
    assert ref.stats_for("calibrate")["batches"] == 2
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", amct_dir / "tmp" / "scale_offset_record.txt", shallow=False)
    for suffix in ("fake_quant_model", "deploy_model"):
        assert _model_bytes(tmp_path / "ref" / f"resnet_{suffix}.onnx") == \
            _model_bytes(amct_dir / "results" / f"resnet_{suffix}.onnx"), suffix


def test_qat_sample_gives_the_pipelines_files(tmp_path):
    from conftest import shared_path
    model = shared_path("models/resnet8_cifar10_bn.onnx")
    images = np.load(shared_path("data/cifar_like212_32_uint8.npz"))["images_nchw_float_0_255"][:16]
    session = Session(load_entrypoints=False)
    qdq = session.build("fuse_bn,match_layers,calibrate,quantize_weights,lower{targets=[qdq] prefix=m}",
                        datasets=["calib"]).run(
        str(model), datasets={"calib": [{"input": images.astype(np.float32)}]}, output_dir=tmp_path / "qdq")
    qdq_model = qdq.files[0]
    _run_sample("qat_convert.py", qdq_model, tmp_path / "amct")
    ref = session.pipeline([session.make_pass("convert_qat"),
                            session.make_pass("lower", targets=["fakequant", "ascend"], prefix="qat",
                                              target_options=ASCEND),
                            session.make_pass("export_amct", quant_config=None)])
    ref.run(str(qdq_model), output_dir=tmp_path / "ref")
    results = tmp_path / "amct" / "results"
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", results / "record.txt", shallow=False)
    for suffix in ("fake_quant_model", "deploy_model"):
        assert _model_bytes(tmp_path / "ref" / f"qat_{suffix}.onnx") == _model_bytes(results / f"qat_{suffix}.onnx")


def test_mobilenet_auto_calibration_sample(tmp_path):
    from conftest import shared_path
    if "auto_calibrate" not in Session(load_entrypoints=False).registry("passes"):
        pytest.skip("the 'auto_calibrate' pass (auto calibration work) is not in this tree")
    model = shared_path("models/mobilenetv2_fp32.onnx")
    archive = np.load(shared_path("data/imagenet_dev250_224_uint8.npz"))
    x = archive["images_nhwc_uint8"][:16].astype(np.float32).transpose(0, 3, 1, 2) / 255
    x = (x - np.array([0.485, 0.456, 0.406], np.float32)[:, None, None]) / np.array([0.229, 0.224, 0.225],
                                                                                     np.float32)[:, None, None]
    np.save(tmp_path / "x.npy", x.astype(np.float32))
    np.save(tmp_path / "y.npy", archive["labels"][:16])
    _run_sample("mobilenet_auto_calibration.py", model, tmp_path / "x.npy", tmp_path / "y.npy", tmp_path / "amct")
    results = tmp_path / "amct" / "results"
    for name in ("mobilenetv2_fake_quant_model.onnx", "mobilenetv2_deploy_model.onnx",
                 "accuracy_based_auto_calibration_final_config.json",
                 "accuracy_based_auto_calibration_ranking_information.json",
                 "accuracy_based_auto_calibration_record.json"):
        assert (results / name).is_file(), name
    assert "scale_d" in (tmp_path / "amct" / "tmp" / "scale_offset_record.txt").read_text()


# -- calibration inside the user's loop ---------------------------------------------------------------
def test_amct_so_is_session_options():
    import onnxruntime as ort
    assert isinstance(amct.AMCT_SO, ort.SessionOptions)
    assert amct.AMCT_SO is amct.AMCT_SO


def test_loop_calibration_equals_pipeline_and_ignores_later_batches(tmp_path):
    model, data = _demo(tmp_path)
    # 3 batches run, batch_num 2: AMCT calibrates on the first two and ignores the third
    config, record, modified = _calibrate(model, data, tmp_path, batch_num=2, batches=3)
    amct.save_model(str(modified), str(record), str(tmp_path / "out" / "demo"))
    ref = _ptq_pipeline(Session(load_entrypoints=False), config, "demo").run(
        str(model), datasets={"calib": _feeds(data, 16, 3)}, output_dir=tmp_path / "ref")
    assert ref.stats_for("calibrate")["batches"] == 2
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", record, shallow=False)
    for suffix in ("fake_quant_model", "deploy_model"):
        assert _model_bytes(tmp_path / "ref" / f"demo_{suffix}.onnx") == \
            _model_bytes(tmp_path / "out" / f"demo_{suffix}.onnx")
    # the modified model computes the float model (BN fused; the taps are a side branch)
    from amct_pipeline.runtime.ort import open_session, run_model
    feed = _feeds(data, 16, 1)[0]
    outputs = open_session(modified, amct.AMCT_SO).run(None, feed)
    assert len(outputs) == 1
    np.testing.assert_allclose(outputs[0], run_model(str(model), feed)[0], rtol=1e-5, atol=1e-5)


def test_loop_in_another_process(tmp_path):
    model, data = _demo(tmp_path)
    config, record, modified = _calibrate(model, data, tmp_path, batch_num=2, batches=0)
    np.save(tmp_path / "x.npy", data[:32])
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "import amct_pipeline.amct_onnx as amct\n"
              "s = ort.InferenceSession(sys.argv[1], amct.AMCT_SO)\n"
              "x = np.load(sys.argv[2])\n"
              "for i in range(2): s.run(None, {'input': x[i * 16:(i + 1) * 16]})\n")
    done = subprocess.run([sys.executable, "-c", script, str(modified), str(tmp_path / "x.npy")],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    amct.save_model(str(modified), str(record), str(tmp_path / "out" / "demo"))
    Session(load_entrypoints=False)
    ref = _ptq_pipeline(Session(load_entrypoints=False), config, "demo").run(
        str(model), datasets={"calib": _feeds(data, 16, 2)}, output_dir=tmp_path / "ref")
    assert ref.files
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", record, shallow=False)


# -- wrong call orders and bad arguments: AMCT-like one-line errors -------------------------------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text and "Traceback" not in text
    return text


def test_save_before_calibration(tmp_path):
    model, data = _demo(tmp_path)
    config, record, modified = _calibrate(model, data, tmp_path, batch_num=2, batches=0)
    assert len(onnx.load(str(modified)).graph.node) > len(onnx.load(str(model)).graph.node)
    with pytest.raises(CalibrationError) as exc:
        amct.save_model(str(modified), str(record), str(tmp_path / "out" / "demo"))
    assert "ensure calibration is finished" in _one_line(exc)
    assert not (tmp_path / "out").exists()


def test_save_after_fewer_batches_than_batch_num(tmp_path):
    model, data = _demo(tmp_path)
    config, record, modified = _calibrate(model, data, tmp_path, batch_num=2, batches=1)
    with pytest.raises(CalibrationError) as exc:
        amct.save_model(str(modified), str(record), str(tmp_path / "out" / "demo"))
    text = _one_line(exc)
    assert "1 of batch_num 2" in text and "ensure calibration is finished" in text


def test_record_from_another_model(tmp_path):
    from amct_pipeline.testing.models import conv_bn
    model, data = _demo(tmp_path)
    _, record, modified = _calibrate(model, data, tmp_path, batch_num=1)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    other = other_dir / "other.onnx"
    onnx.save(conv_bn(), str(other))
    x = np.random.default_rng(0).normal(size=[2, *[d.dim_value for d in onnx.load(str(other)).graph.input[0]
                                                   .type.tensor_type.shape.dim][1:]]).astype(np.float32)
    from amct_pipeline.runtime.ort import open_session
    config2, record2, modified2 = other_dir / "c.json", other_dir / "r.txt", other_dir / "m.onnx"
    amct.create_quant_config(str(config2), str(other))
    amct.quantize_model(str(config2), str(other), str(modified2), str(record2))
    session = open_session(modified2, amct.AMCT_SO)
    session.run(None, {session.get_inputs()[0].name: x})
    with pytest.raises(AmctError) as exc:
        amct.save_model(str(modified), str(record2), str(tmp_path / "out" / "demo"))
    text = _one_line(exc)
    assert "not a quantizable layer of the model" in text and str(record2) in text


@pytest.mark.parametrize("call, words", [
    (lambda t, m: amct.create_quant_config(str(t / "c.json"), str(m), batch_num=0), "argument batch_num"),
    (lambda t, m: amct.create_quant_config(str(t / "c.json"), str(t / "missing.onnx")), "argument model_file"),
    (lambda t, m: amct.create_quant_config(str(t / "c.json"), str(m), activation_offset="yes"),
     "argument activation_offset"),
    (lambda t, m: amct.quantize_model(str(t / "missing.json"), str(m), str(t / "q.onnx"), str(t / "r.txt")),
     "argument config_file"),
    (lambda t, m: amct.save_model(str(m), str(m), str(t / "out" / "x")), "not a modified model"),
    (lambda t, m: amct.save_model(str(m), str(m), ""), "argument save_path"),
])
def test_bad_arguments(tmp_path, call, words):
    model, _ = _demo(tmp_path)
    with pytest.raises(AmctError) as exc:
        call(tmp_path, model)
    assert words in _one_line(exc)


def test_skip_layers_and_cfg(tmp_path):
    model, data = _demo(tmp_path)
    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(model), skip_layers=["conv2"], batch_num=3, activation_offset=False)
    written = onnx.load(str(model))
    import json
    data_json = json.loads(config.read_text())
    assert data_json["batch_num"] == 3 and data_json["activation_offset"] is False
    assert data_json["conv2"]["quant_enable"] is False and data_json["conv1"]["quant_enable"] is True
    cfg = tmp_path / "quant.cfg"
    cfg.write_text("batch_num: 2\nskip_layers: \"fc\"\n")
    amct.create_quant_config(str(config), str(model), skip_layers=["conv2"], config_defination=str(cfg))
    from_cfg = json.loads(config.read_text())
    assert from_cfg["batch_num"] == 2 and from_cfg["fc"]["quant_enable"] is False
    assert from_cfg["conv2"]["quant_enable"] is True        # AMCT: the .cfg wins over skip_layers
    assert written.graph.node                               # the model is untouched


# -- the command line ---------------------------------------------------------------------------------
def _bins(tmp_path, data, batch_size=16):
    folder = tmp_path / "bins" / "input"
    folder.mkdir(parents=True)
    for i in range(len(data) // batch_size):
        data[i * batch_size:(i + 1) * batch_size].tofile(folder / f"{i:04d}.bin")
    return folder


def test_cli_bins_give_the_record_of_ifmr_arq_on_npy(tmp_path, capsys):
    """`amct-pipeline amct-calibration` on .bin folders = fuse_bn,match_layers,calibrate{ifmr},
    quantize_weights{arq},lower,export_amct (ptq_int8 without block outputs) on the same data as .npy."""
    from amct_pipeline.cli.main import main
    model, data = _demo(tmp_path, count=48)
    folder = _bins(tmp_path, data)
    code = main(["amct-calibration", "--model", str(model), "--save_path", str(tmp_path / "out" / "demo"),
                 "--input_shape", "input:16,3,32,32", "--data_dir", str(folder), "--data_types", "float32"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "demo_fake_quant_model.onnx").is_file()
    assert (tmp_path / "out" / "demo_deploy_model.onnx").is_file()
    np.save(tmp_path / "x.npy", data)
    session = Session(load_entrypoints=False)
    ref = session.build({"schema_version": 1, "name": "ifmr-arq",
                         "datasets": {"calib": {"reader": "npy", "batch_size": 16}},
                         "passes": [{"pass": "fuse_bn"}, {"pass": "match_layers"},
                                    {"pass": "calibrate", "options": {"algorithm": "ifmr", "dataset": "calib"}},
                                    {"pass": "quantize_weights", "options": {"algorithm": "arq"}},
                                    {"pass": "lower", "options": {"targets": ["fakequant"]}}, {"pass": "export_amct"}]})
    result = ref.run(str(model), datasets={"calib": str(tmp_path / "x.npy")}, output_dir=tmp_path / "ref")
    assert result.stats_for("calibrate")["batches"] == 3
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", tmp_path / "out" / "amct_temp" / "record.txt", shallow=False)


@pytest.mark.parametrize("args, words", [
    (["--input_shape", "input:16,3,32,32"], "--data_dir is required"),
    (["--input_shape", "input:16,3,x,32", "--data_dir", "{bins}"], 'cannot parse "input:16,3,x,32"'),
    (["--input_shape", "input16,3,32,32", "--data_dir", "{bins}"], "cannot parse"),
    (["--input_shape", "image:16,3,32,32", "--data_dir", "{bins}"], '"image" is not an input'),
    (["--input_shape", "input:8,3,32,32", "--data_dir", "{bins}"], "holds 196608 bytes"),
    (["--input_shape", "input:16,3,32,32", "--data_dir", "{bins};{bins}"], "2 value(s) for 1 input"),
    (["--input_shape", "input:16,3,32,32", "--data_dir", "{bins}", "--data_types", "text"], "not a numeric type"),
    (["--input_shape", "input:16,3,32,32", "--data_dir", "{missing}"], "is not a folder"),
])
def test_cli_errors(tmp_path, capsys, args, words):
    from amct_pipeline.cli.main import main
    model, data = _demo(tmp_path, count=16)
    folder = _bins(tmp_path, data)
    args = [a.format(bins=folder, missing=tmp_path / "nope") for a in args]
    code = main(["amct-calibration", "--model", str(model), "--save_path", str(tmp_path / "out" / "m"), *args])
    err = capsys.readouterr().err
    assert code == 1
    assert words in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "m_deploy_model.onnx").exists()


def test_cli_bin_symlink_out_of_folder_refused(tmp_path, capsys):
    from amct_pipeline.cli.main import main
    model, data = _demo(tmp_path, count=16)
    folder = _bins(tmp_path, data)
    secret = tmp_path / "secret.bin"
    data.tofile(secret)
    (folder / "zz.bin").symlink_to(secret)
    code = main(["amct-calibration", "--model", str(model), "--save_path", str(tmp_path / "out" / "m"),
                 "--input_shape", "input:16,3,32,32", "--data_dir", str(folder)])
    assert code == 1 and "leads outside" in capsys.readouterr().err


def test_amct_onnx_entry_point(tmp_path, capsys):
    from amct_pipeline.amct_onnx.cli import main
    model, data = _demo(tmp_path, count=16)
    code = main(["calibration", "--model", str(model), "--save_path", str(tmp_path / "out" / "m"),
                 "--input_shape", "input:16,3,32,32", "--data_dir", str(_bins(tmp_path, data))])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "m_deploy_model.onnx").is_file()


# -- DMQ: quantize_preprocess -> loop -> quantize_model -> loop -> save_model -------------------------
def test_dmq_flow_gives_the_pipelines_record_and_models(tmp_path):
    """AMCT's DMQ sample order on the demo model equals fuse_bn,match_layers,dmq_balance,calibrate,
    quantize_weights,lower,export_amct on the same batches."""
    import json

    from amct_pipeline.runtime.ort import open_session
    model, data = _demo(tmp_path)
    cfg = tmp_path / "dmq.cfg"
    cfg.write_text("batch_num: 2\ncommon_config {\n  dmq_balancer { migration_strength: 0.4 }\n}\n")
    config, record = tmp_path / "config.json", tmp_path / "record.txt"
    amct.create_quant_config(str(config), str(model), config_defination=str(cfg))
    amct.quantize_preprocess(str(config), str(record), str(model), str(tmp_path / "pre.onnx"))
    with pytest.raises(AmctError) as exc:                 # the DMQ model is not the one to save from
        amct.save_model(str(tmp_path / "pre.onnx"), str(record), str(tmp_path / "out" / "demo"))
    assert "quantize_preprocess's model" in _one_line(exc)
    session = open_session(tmp_path / "pre.onnx", amct.AMCT_SO)
    for feed in _feeds(data, 16, 2):
        session.run(None, feed)
    amct.quantize_model(str(config), str(model), str(tmp_path / "mod.onnx"), str(record))
    session = open_session(tmp_path / "mod.onnx", amct.AMCT_SO)
    for feed in _feeds(data, 16, 2):
        session.run(None, feed)
    amct.save_model(str(tmp_path / "mod.onnx"), str(record), str(tmp_path / "out" / "demo"))
    layers = [name for name, v in json.loads(config.read_text()).items()
              if isinstance(v, dict) and "dmq_balancer_param" in v]
    assert layers
    s = Session(load_entrypoints=False)
    ref = s.pipeline([s.make_pass("fuse_bn", amct_config=str(config)),
                      s.make_pass("match_layers", amct_config=str(config)),
                      s.make_pass("dmq_balance", layers=layers, migration_strength=0.4),
                      s.make_pass("calibrate", algorithm="ifmr"), s.make_pass("quantize_weights", algorithm="arq"),
                      s.make_pass("lower", targets=["fakequant", "ascend"], prefix="demo", target_options=ASCEND),
                      s.make_pass("export_amct", quant_config=None)])
    ref.run(str(model), datasets={"calib": _feeds(data, 16, 2)}, output_dir=tmp_path / "ref")
    assert "tensor_balance_factor" in record.read_text()
    assert filecmp.cmp(tmp_path / "ref" / "record.txt", record, shallow=False)
    for suffix in ("fake_quant_model", "deploy_model"):
        assert _model_bytes(tmp_path / "ref" / f"demo_{suffix}.onnx") == \
            _model_bytes(tmp_path / "out" / f"demo_{suffix}.onnx")


def test_dmq_without_a_dmq_setting(tmp_path):
    model, _ = _demo(tmp_path)
    amct.create_quant_config(str(tmp_path / "c.json"), str(model))
    with pytest.raises(AmctError) as exc:
        amct.quantize_preprocess(str(tmp_path / "c.json"), str(tmp_path / "r.txt"), str(model), str(tmp_path / "p.onnx"))
    assert "no layer has a DMQ setting" in _one_line(exc)


def test_auto_calibration_names_a_missing_pass(tmp_path):
    if "auto_calibrate" in Session(load_entrypoints=False).registry("passes"):
        pytest.skip("the 'auto_calibrate' pass is installed; test_mobilenet_auto_calibration_sample covers it")
    model, _ = _demo(tmp_path)
    amct.create_quant_config(str(tmp_path / "c.json"), str(model))

    class Evaluator:
        def calibration(self, model_file): ...
        def evaluate(self, model_file): return 1.0
        def metric_eval(self, original, new): return True, 0.0

    with pytest.raises(AmctError) as exc:
        amct.accuracy_based_auto_calibration(str(model), Evaluator(), str(tmp_path / "c.json"),
                                             str(tmp_path / "r.txt"), str(tmp_path / "out" / "demo"))
    assert "'auto_calibrate' pass" in _one_line(exc)


def test_a_failing_calibration_never_aborts_the_users_loop(tmp_path):
    """An exception must not cross the onnxruntime-extensions operator (it would abort the process):
    the loop goes on, a warning says what failed, save_model raises it in one line."""
    model, data = _demo(tmp_path)
    data[3] = np.nan
    np.save(tmp_path / "x.npy", data[:32])
    script = ("import sys, numpy as np, onnxruntime as ort\n"
              "import amct_pipeline.amct_onnx as amct\n"
              "from amct_pipeline.errors import CalibrationError\n"
              "m, d = sys.argv[1], sys.argv[2]\n"
              "amct.create_quant_config(d + '/c.json', m, batch_num=2)\n"
              "amct.quantize_model(d + '/c.json', m, d + '/q.onnx', d + '/r.txt')\n"
              "s = ort.InferenceSession(d + '/q.onnx', amct.AMCT_SO)\n"
              "x = np.load(d + '/x.npy')\n"
              "for i in range(2): s.run(None, {'input': x[i * 16:(i + 1) * 16]})\n"
              "try:\n"
              "    amct.save_model(d + '/q.onnx', d + '/r.txt', d + '/out/m')\n"
              "except CalibrationError as exc:\n"
              "    print('ERROR', exc)\n")
    done = subprocess.run([sys.executable, "-c", script, str(model), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "NaN or Inf" in done.stderr and "save_model will report it" in done.stderr
    lines = [line for line in done.stdout.splitlines() if line.startswith("ERROR")]
    assert len(lines) == 1 and "NaN or Inf" in lines[0] and "layer 'conv1'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_cli_evaluator_and_cfg(tmp_path, capsys):
    """--evaluator's customize_evaluator.calibration(modified_model) runs the calibration loop;
    --calibration_config's batch_num and skip_layers apply."""
    from amct_pipeline.cli.main import main
    model, data = _demo(tmp_path, count=32)
    np.save(tmp_path / "x.npy", data)
    evaluator = tmp_path / "evaluator.py"
    evaluator.write_text(
        "import numpy as np, onnxruntime as ort\n"
        "import amct_pipeline.amct_onnx as amct\n"
        f"X = np.load({str(tmp_path / 'x.npy')!r})\n"
        "class Evaluator:\n"
        "    def calibration(self, model_file):\n"
        "        s = ort.InferenceSession(model_file, amct.AMCT_SO)\n"
        "        for i in range(2):\n"
        "            s.run(None, {'input': X[i * 16:(i + 1) * 16]})\n"
        "customize_evaluator = Evaluator()\n")
    cfg = tmp_path / "quant.cfg"
    cfg.write_text('batch_num: 2\nskip_layers: "fc"\n')
    code = main(["amct-calibration", "--model", str(model), "--save_path", str(tmp_path / "out" / "m"),
                 "--evaluator", str(evaluator), "--calibration_config", str(cfg)])
    assert code == 0, capsys.readouterr().err
    record = (tmp_path / "out" / "amct_temp" / "record.txt").read_text()
    assert 'key: "conv1"' in record and 'key: "fc"' not in record
    assert (tmp_path / "out" / "m_deploy_model.onnx").is_file()


def test_auto_calibration_gives_the_pipelines_files(tmp_path):
    """accuracy_based_auto_calibration (calibration through the evaluator, then auto_calibrate on the
    kept batches) = fuse_bn,match_layers,calibrate{ifmr},quantize_weights{arq},auto_calibrate on the
    same batches; the evaluator forces a roll-back (it accepts 90% of the all-quantized loss)."""
    if "auto_calibrate" not in Session(load_entrypoints=False).registry("passes"):
        pytest.skip("the 'auto_calibrate' pass (auto calibration work) is not in this tree")
    from amct_pipeline.amct_onnx.common.auto_calibration import AutoCalibrationEvaluatorBase
    from amct_pipeline.runtime.ort import open_session, run_model
    model, data = _demo(tmp_path)
    feeds = _feeds(data, 16, 2)
    reference = np.concatenate([run_model(str(model), f)[0] for f in feeds])

    class Evaluator(AutoCalibrationEvaluatorBase):
        def __init__(self):
            self.limit = None

        def calibration(self, model_file):
            session = open_session(model_file, amct.AMCT_SO)
            for feed in feeds:
                session.run(None, feed)

        def evaluate(self, model_file):
            out = np.concatenate([run_model(model_file, f)[0] for f in feeds])
            return -float(np.mean((out - reference) ** 2))

        def metric_eval(self, original_metric, new_metric):
            loss = original_metric - new_metric
            if self.limit is None and loss > 0:
                self.limit = loss * 0.9
            return loss <= (self.limit or 0.0), loss

    config = tmp_path / "config.json"
    amct.create_quant_config(str(config), str(model), batch_num=2)
    amct.accuracy_based_auto_calibration(str(model), Evaluator(), str(config), str(tmp_path / "record.txt"),
                                         str(tmp_path / "out" / "demo"))
    s = Session(load_entrypoints=False)
    ref = s.pipeline([s.make_pass("fuse_bn", amct_config=str(config)), s.make_pass("match_layers", amct_config=str(config)),
                      s.make_pass("calibrate", algorithm="ifmr"), s.make_pass("quantize_weights", algorithm="arq"),
                      s.make_pass("auto_calibrate", evaluator=Evaluator(), prefix="demo", targets=["fakequant", "ascend"])])
    result = ref.run(str(model), datasets={"calib": feeds}, output_dir=tmp_path / "ref")
    assert result.stats_for("auto_calibrate")["changed"] >= 1          # something was rolled back
    out = tmp_path / "out"
    for name in ("accuracy_based_auto_calibration_final_config.json",
                 "accuracy_based_auto_calibration_ranking_information.json"):
        assert (out / name).read_text() == (tmp_path / "ref" / name).read_text(), name
    for suffix in ("fake_quant_model", "deploy_model"):
        assert _model_bytes(tmp_path / "ref" / f"demo_{suffix}.onnx") == _model_bytes(out / f"demo_{suffix}.onnx")
    assert not [p for p in out.iterdir() if p.name.startswith(".amct")]      # no temporary folder left


def test_a_modified_model_never_replaces_a_file_that_is_not_its_record(tmp_path):
    """The record path travels inside the modified model; a model naming another file cannot overwrite it."""
    from amct_pipeline.runtime.ort import open_session
    model, data = _demo(tmp_path)
    config, record, modified = _calibrate(model, data, tmp_path, batch_num=2, batches=0)
    record.write_text("precious notes, not a record\n")
    session = open_session(modified, amct.AMCT_SO)
    with pytest.warns(RuntimeWarning, match="not a record quantize_model wrote"):
        for feed in _feeds(data, 16, 2):
            session.run(None, feed)
    assert record.read_text() == "precious notes, not a record\n"
