"""Data files: read lazily (only the samples used), headers checked, FIFOs and devices refused, shards work."""
from __future__ import annotations

import io
import os
import threading
import tracemalloc
import zipfile

import numpy as np
import pytest

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.errors import DataError
from amct_pipeline.pipeline.spec import DatasetSpec
from amct_pipeline.runtime.arrays import NpzArray, ShardedArray, read_arrays, read_directory
from amct_pipeline.runtime.data import NpyReader, model_inputs
from amct_pipeline.ir import load_graph
from sec_helpers import digests, run_cli, save_model, shared_path, visible


def _header(shape, descr="<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": descr, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def _calibrate(capsys, tmp_path, data, *extra):
    model = save_model(build_demo_model(), tmp_path / "demo.onnx")
    return run_cli(capsys, "run", "fuse_bn,match_layers,calibrate{algorithm=minmax},quantize_weights,lower,"
                   "export_amct", "--model", model, "--data", f"calib={data}", "-o", tmp_path / "out", "-q", *extra)


def _error(capsys, tmp_path, data) -> str:
    code, err = _calibrate(capsys, tmp_path, data)
    errors = [e for e in err if e.startswith("amct-pipeline: error:")]
    assert code == 1 and len(errors) == 1 and "internal error" not in errors[0], err
    assert not (tmp_path / "out").exists()
    return errors[0]


# -- the README's directory of .npy shards ----------------------------------------------------------
def test_directory_of_npy_shards_calibrates_like_one_file(capsys, tmp_path):
    data = build_demo_data(48)
    shards = tmp_path / "shards"
    shards.mkdir()
    for i, part in enumerate(np.split(data, [16, 40])):
        np.save(shards / f"part{i}.npy", part)
    np.save(tmp_path / "whole.npy", data)
    before = digests(shards)
    assert _calibrate(capsys, tmp_path / "a", shards)[0] == 0
    assert _calibrate(capsys, tmp_path / "b", tmp_path / "whole.npy")[0] == 0
    for name in visible(tmp_path / "a" / "out"):
        assert (tmp_path / "a" / "out" / name).read_bytes() == (tmp_path / "b" / "out" / name).read_bytes(), name
    assert digests(shards) == before


def test_npz_shards_and_lazy_concatenation(tmp_path):
    data = np.arange(60, dtype=np.float32).reshape(10, 6)
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez_compressed(folder / "a.npz", x=data[:3], y=data[:3] * 2)
    np.savez(folder / "b.npz", x=data[3:], y=data[3:] * 2)
    arrays, files = read_directory("d", folder)
    assert [f.name for f in files] == ["a.npz", "b.npz"] and isinstance(arrays["x"], ShardedArray)
    for lo, hi in ((0, 10), (2, 5), (3, 3), (9, 10), (0, 2)):
        assert np.array_equal(arrays["x"][lo:hi], data[lo:hi]) and np.array_equal(arrays["y"][lo:hi], 2 * data[lo:hi])


@pytest.mark.parametrize("problem", ["names", "shape", "mixed"])
def test_shards_that_do_not_fit_together(tmp_path, problem):
    folder = tmp_path / "d"
    folder.mkdir()
    if problem == "names":
        np.savez(folder / "a.npz", x=np.zeros((2, 3)))
        np.savez(folder / "b.npz", z=np.zeros((2, 3)))
    elif problem == "shape":
        np.save(folder / "a.npy", np.zeros((2, 3), np.float32))
        np.save(folder / "b.npy", np.zeros((2, 4), np.float32))
    else:
        np.save(folder / "a.npy", np.zeros((2, 3), np.float32))
        np.savez(folder / "b.npz", x=np.zeros((2, 3)))
    with pytest.raises(DataError, match={"names": "same array names", "shape": "shards must agree",
                                          "mixed": "mixes .npy and .npz"}[problem]):
        read_directory("d", folder)


# -- lazy reading -----------------------------------------------------------------------------------------
def test_npz_reads_only_the_samples_used(tmp_path):
    """A 98 MB member compressed to ~100 KB: the first batch costs ~1 MB, not the whole member."""
    big = np.zeros((2000, 3, 64, 64), np.float32)
    big[:, 0, 0, 0] = np.arange(2000)
    np.savez_compressed(tmp_path / "big.npz", x=big)
    del big
    tracemalloc.start()
    try:
        array = read_arrays("calib", tmp_path / "big.npz")["x"]
        first = array[0:8]
        later = array[100:104]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(array, NpzArray) and array.shape == (2000, 3, 64, 64)
    assert list(first[:, 0, 0, 0]) == list(range(8)) and list(later[:, 0, 0, 0]) == [100, 101, 102, 103]
    assert peak < 8 << 20, f"peak {peak / 2**20:.1f} MiB"


def test_npz_matches_np_load_on_the_shared_data():
    path = shared_path("data/digits_test_split.npz")
    lazy = read_arrays("d", path)
    with np.load(path) as npz:
        for key in npz.files:
            assert np.array_equal(lazy[key][5:77], npz[key][5:77]) and lazy[key].dtype == npz[key].dtype


# -- headers and file kinds ---------------------------------------------------------------------------------
def test_npz_header_claiming_absurd_sizes(capsys, tmp_path):
    with zipfile.ZipFile(tmp_path / "absurd.npz", "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("input.npy", _header((10 ** 15, 3, 32, 32)) + bytes(64))
    line = _error(capsys, tmp_path, tmp_path / "absurd.npz")
    assert "array 'input'" in line and "header claims shape (1000000000000000, 3, 32, 32)" in line


def test_npy_header_claiming_more_than_the_file(capsys, tmp_path):
    (tmp_path / "huge.npy").write_bytes(_header((10 ** 12, 3, 32, 32)) + bytes(64))
    assert "truncated or corrupt" in _error(capsys, tmp_path, tmp_path / "huge.npy")


def test_zero_d_and_negative_shapes(capsys, tmp_path):
    np.save(tmp_path / "scalar.npy", np.float32(1))
    assert "0-d array" in _error(capsys, tmp_path, tmp_path / "scalar.npy")
    (tmp_path / "neg.npy").write_bytes(_header((-3, 3, 32, 32)))
    assert "negative dimension" in _error(capsys, tmp_path, tmp_path / "neg.npy")
    with zipfile.ZipFile(tmp_path / "scalar.npz", "w") as archive:
        archive.writestr("x.npy", _header(()) + bytes(4))
    assert "0-d array" in _error(capsys, tmp_path, tmp_path / "scalar.npz")


def test_pickled_and_garbage_files(capsys, tmp_path):
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "Python objects" in _error(capsys, tmp_path, tmp_path / "obj.npy")
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04garbage")
    assert "cannot read" in _error(capsys, tmp_path, tmp_path / "junk.npz")
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY\x01\x00garbage")
    assert "not a valid .npy" in _error(capsys, tmp_path, tmp_path / "junk.npy")


def test_fifo_named_as_data_is_refused_without_hanging(capsys, tmp_path):
    fifo = tmp_path / "calib.npy"
    os.mkfifo(fifo)
    done = threading.Event()

    def unblock():             # should the reader block on the FIFO, open its other end so the test ends
        if not done.wait(20):
            with open(fifo, "wb"):
                pass
    threading.Thread(target=unblock, daemon=True).start()
    try:
        line = _error(capsys, tmp_path, fifo)
    finally:
        done.set()
    assert "is a FIFO, not a regular file" in line
    folder = tmp_path / "d"
    folder.mkdir()
    os.mkfifo(folder / "part0.npy")
    assert "is a FIFO" in _error(capsys, tmp_path, folder)


def test_devices_are_not_called_missing(capsys, tmp_path):
    line = _error(capsys, tmp_path, "/dev/zero")
    assert "/dev/zero is a character device, not a regular file" in line and "does not exist" not in line
    os.symlink("/dev/zero", tmp_path / "zero.npy")
    assert "character device" in _error(capsys, tmp_path, tmp_path / "zero.npy")


def test_reader_lists_the_files_it_reads(tmp_path):
    np.save(tmp_path / "x.npy", build_demo_data(4))
    source = NpyReader().open("calib", DatasetSpec(path=str(tmp_path / "x.npy"), batch_size=2), tmp_path)
    assert source.files == [tmp_path / "x.npy"]
    graph = load_graph(build_demo_model())
    batches = list(source.batches(model_inputs(graph)))
    assert len(batches) == 2 and np.array_equal(batches[1]["input"], build_demo_data(4)[2:])


def test_npz_with_a_member_twice(tmp_path):
    import warnings
    with warnings.catch_warnings(), zipfile.ZipFile(tmp_path / "twice.npz", "w") as archive:
        warnings.simplefilter("ignore")
        for _ in range(2):
            buffer = io.BytesIO()
            np.save(buffer, np.zeros((2, 3), np.float32))
            archive.writestr("x.npy", buffer.getvalue())
    with pytest.raises(DataError, match="holds array 'x' twice"):
        read_arrays("d", tmp_path / "twice.npz")
