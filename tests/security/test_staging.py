"""The staging folder: owned by a pid, removed by the next run once its owner is gone."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from amct_pipeline.pipeline.staging import LEGACY_STALE_SECONDS, OutputStage, _host_tag, _start_ticks, staging_owner
from sec_helpers import conv_model, run_cli, save_model, visible


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _stale(out, name):
    folder = out / name
    folder.mkdir(parents=True)
    (folder / "m.onnx").write_bytes(b"partial")
    return folder


def test_staging_name_records_the_owner(tmp_path):
    stage = OutputStage(tmp_path / "out")
    staged = stage.path("x.onnx")
    owner = staging_owner(staged.parent.name)
    assert owner == (_host_tag(), os.getpid(), _start_ticks(os.getpid()))
    stage.abort()
    assert not (tmp_path / "out").exists()         # the folder this stage created is gone again


def test_next_run_removes_only_stale_staging_folders(capsys, tmp_path):
    model = save_model(conv_model(), tmp_path / "m.onnx")
    out = tmp_path / "out"
    host = _host_tag()
    dead = _stale(out, f".amct-staging-{host}-{_dead_pid()}-12345-abcd")
    live_child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        live = _stale(out, f".amct-staging-{host}-{live_child.pid}-{_start_ticks(live_child.pid)}-efgh")
        reused = _stale(out, f".amct-staging-{host}-{live_child.pid}-1-ijkl")       # same pid, other process
        other_host = _stale(out, f".amct-staging-{'0' * 8 if host != '0' * 8 else '1' * 8}-1-1-mnop")
        legacy_new = _stale(out, ".amct-staging-qrst")
        legacy_old = _stale(out, ".amct-staging-uvwx")
        old = time.time() - LEGACY_STALE_SECONDS - 60
        os.utime(legacy_old, (old, old))
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        (elsewhere / "keep.txt").write_text("x")
        os.symlink(elsewhere, out / f".amct-staging-{host}-{_dead_pid()}-1-link")
        code, err = run_cli(capsys, "run", "save", "--model", model, "-o", out, "-q")
        assert code == 0, err
        left = visible(out)
        assert dead.name not in left and reused.name not in left and legacy_old.name not in left
        assert {live.name, other_host.name, legacy_new.name} <= left
        assert (elsewhere / "keep.txt").exists()
        assert "m.onnx" in left and (out / "m.onnx").read_bytes() != b"partial"
    finally:
        live_child.kill()
        live_child.wait()


def test_commit_is_a_rename_of_complete_files(tmp_path):
    stage = OutputStage(tmp_path / "out")
    stage.path("a.txt").write_text("a")
    stage.path("b.txt").write_text("b")
    assert visible(tmp_path / "out") == {stage._staging.name}
    written = stage.commit()
    assert [p.name for p in written] == ["a.txt", "b.txt"] and visible(tmp_path / "out") == {"a.txt", "b.txt"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_output_folder_is_reported_first(capsys, tmp_path):
    model = save_model(conv_model(), tmp_path / "m.onnx")
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    code, err = run_cli(capsys, "run", "save", "--model", model, "-o", locked / "out", "-q")
    assert code == 1 and "not writable" in err[-1]
