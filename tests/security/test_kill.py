"""kill -9 at random points of a ptq_int8 CLI run, 20 times: no partial visible output, inputs untouched,
and the next run leaves no stale staging folder.

Each run is ``amct_pipeline.cli.main.main(["run", "ptq_int8", ...])`` in its own process, forked from a
helper process that imported everything once (a fresh interpreter spends ~3 s importing onnx and
onnxruntime, which would leave the kills almost no pipeline work to land in). The kill times are
uniform over a complete run's duration, so they fall in every pass, in the staged writes and in the
final renames. The last run is a real ``python -m amct_pipeline`` process.
"""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx

from amct_pipeline.demo import build_demo_data, build_demo_model
from amct_pipeline.files import STAGING_PREFIX
from sec_helpers import digests

KILLS = 20
ZYGOTE = textwrap.dedent("""
    import json, os, sys
    from amct_pipeline.session import Session
    from amct_pipeline.cli.main import main
    import onnxruntime, onnx_graphsurgeon                   # everything a run imports, once
    Session(load_entrypoints=False)
    print("ready", flush=True)
    for line in iter(sys.stdin.readline, ""):
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            code = 3
            try:
                code = main(job["argv"])
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        print(pid, flush=True)
        sys.stdin.readline()            # reaped only when told: until then the pid cannot be reused
        _, status = os.waitpid(pid, 0)
        print(status, flush=True)
""")


def _inputs(folder: Path) -> tuple[Path, Path]:
    folder.mkdir()
    model = folder / "demo.onnx"
    onnx.save_model(build_demo_model(), str(model), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="demo.onnx.data", size_threshold=256)
    data = folder / "calib.npy"
    np.save(data, build_demo_data(32))
    return model, data


class Zygote:
    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True)
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, argv: list[str], log: Path) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def wait(self) -> int:
        self.proc.stdin.write("reap\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _pass_times(log: str) -> list[tuple[str, float]]:
    """(progress line head ``[i/n] name`` of each pass, its duration) from a complete run's log."""
    times = []
    for line in log.splitlines():
        if line.startswith("[") and " done in " in line:
            head, took = line.split(" done in ", 1)
            times.append((head, float(took.split("s", 1)[0])))
    return times


def _wait_for(log: Path, marker: str, timeout: float) -> None:
    """Until the run's log holds ``marker`` (its progress line), polling every millisecond."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if log.exists() and marker in log.read_text():
            return
        time.sleep(0.001)


def _staging(out: Path) -> set[str]:
    return {p.name for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)} if out.exists() else set()


def test_kill_minus_nine_at_random_points(tmp_path):
    started = time.perf_counter()
    model, data = _inputs(tmp_path / "in")
    inputs_before = digests(tmp_path / "in")
    argv = ["run", "ptq_int8", "--model", str(model), "--data", f"calib={data}", "--no-plugins"]
    zygote = Zygote()
    try:
        # a complete run: the reference outputs and how long a run takes
        ref = tmp_path / "ref"
        t0 = time.perf_counter()
        zygote.start(argv + ["-o", str(ref)], tmp_path / "ref.log")
        assert zygote.wait() == 0, (tmp_path / "ref.log").read_text()
        duration = time.perf_counter() - t0
        reference = {p.name: p.read_bytes() for p in ref.iterdir()}
        assert set(reference) == {"demo_fake_quant_model.onnx", "demo_qdq_model.onnx", "record.txt",
                                  "demo_quant_config.json"}

        out = tmp_path / "out"
        rng = random.Random(20260512)
        passes = _pass_times((tmp_path / "ref.log").read_text())
        reached, previous_staging = [], set()
        for kill in range(KILLS):
            log = tmp_path / f"kill{kill}.log"
            pid = zygote.start(argv + ["-o", str(out)], log)
            # phases in turn: setup, inside each pass (after its progress line), and after the last pass
            # (staged writes, the final renames); a random point within the phase's reference duration
            phase = kill % (len(passes) + 2)
            if phase == 0:
                time.sleep(rng.uniform(0.0, 0.05))
            else:
                head, span = passes[phase - 1] if phase <= len(passes) else (passes[-1][0], 0.02)
                _wait_for(log, f"{head} ..." if phase <= len(passes) else f"{head} done", timeout=duration * 5 + 5)
                time.sleep(rng.uniform(0.0, span))
            os.kill(pid, signal.SIGKILL)      # our own grandchild, by pid; not reaped yet, so never reused
            status = zygote.wait()
            progress = [line.split(" ")[:3] for line in log.read_text().splitlines() if line.startswith("[")]
            staged = sum(len(list((out / s).iterdir())) for s in _staging(out))
            shown = len([p for p in out.iterdir() if not p.name.startswith(".")]) if out.exists() else 0
            phase = "exited" if status == 0 else " ".join(progress[-1][1:]) if progress else "setup"
            reached.append(f"{phase} (staged {staged}, visible {shown})")
            # no partial visible output: every visible file is a whole output of the run
            for entry in out.iterdir() if out.exists() else ():
                if not entry.name.startswith("."):
                    assert entry.read_bytes() == reference[entry.name], f"kill {kill}: {entry.name} is partial"
            assert digests(tmp_path / "in") == inputs_before, f"kill {kill}: an input changed"
            # a run that reached its passes removed the stale staging folders of the runs killed before it
            # (one killed while still importing or checking its inputs never got that far)
            staging = _staging(out)
            if progress:
                assert not (staging & previous_staging), f"kill {kill}: stale {staging & previous_staging}"
            assert len(staging) <= 1
            previous_staging = staging
    finally:
        zygote.close()

    # the next run, a real process: completes, leaves no staging folder, same bytes as the reference
    done = subprocess.run([sys.executable, "-m", "amct_pipeline", *argv, "-o", str(out), "-q"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert _staging(out) == set()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == reference
    assert digests(tmp_path / "in") == inputs_before
    print(f"\n{KILLS} kills in {time.perf_counter() - started:.1f} s (a run: {duration:.2f} s); where each "
          f"landed: {'; '.join(reached)}")
    assert len({r.split(" (")[0] for r in reached}) >= 4, f"kills landed in too few places: {reached}"
