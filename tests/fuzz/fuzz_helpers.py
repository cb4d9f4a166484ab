"""Shared machinery of the fuzzing suite: case budget, hypothesis settings, the sandbox and the CLI runner.

Every case calls the CLI's ``main(argv)`` in-process (no subprocess) inside a sandbox folder::

    root/inputs/     model, data, pipeline and AMCT files the case reads (byte-identical afterwards)
    root/out/        the --output-dir (emptied between cases)
    root/cwd/        the working directory
    root/elsewhere/  a folder absolute and '..' paths in the generated inputs point at

and checks: the exit status is 0, 1 (the project's one-line error) or 2 (argparse usage), never 3
(internal error); on exit 1 every stderr line is ``amct-pipeline: ...``; nothing under ``root`` was
created or changed outside ``out/``; and the inputs are byte-identical. A case that runs longer than
``CASE_SECONDS`` fails (a hang, e.g. reading a FIFO).

Budget: ``AMCT_FUZZ_EXAMPLES`` (default 1100) generated cases in total, split between the tests by
the weights below; ``AMCT_FUZZ_EXAMPLES=20000 pytest tests/fuzz`` fuzzes longer locally. Generation
is derandomized (``derandomize=True``): CI runs the same cases every time.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import signal
import warnings
from pathlib import Path
from typing import Sequence

from hypothesis import HealthCheck, Phase, settings

TOTAL = int(os.environ.get("AMCT_FUZZ_EXAMPLES", "1100"))
# share of the total per test (sums to 1)
WEIGHTS = {
    "text": 0.20, "files": 0.14, "set": 0.10, "options": 0.10, "models": 0.14,
    "quant_config": 0.07, "cfg": 0.07, "record": 0.07, "data": 0.11,
}
CASE_SECONDS = 30
COUNTS: dict[str, int] = {}
SPAN: list[float] = []               # wall clock of the first case start and last case end (tests/conftest.py)
AUTOLOAD_ENV = "AMCT_PIPELINE_DISABLE_PLUGIN_AUTOLOAD"


def planned(kind: str) -> int:
    return max(5, round(TOTAL * WEIGHTS[kind]))


def fuzz_settings(kind: str):
    return settings(max_examples=planned(kind), derandomize=True, deadline=None, database=None,
                    phases=[Phase.explicit, Phase.generate, Phase.shrink], print_blob=False,
                    suppress_health_check=list(HealthCheck))


class CaseTimeout(Exception):
    pass


class Sandbox:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.inputs, self.out, self.cwd, self.elsewhere = (root / n for n in ("inputs", "out", "cwd", "elsewhere"))
        for folder in (self.inputs, self.cwd, self.elsewhere):
            folder.mkdir(parents=True, exist_ok=True)
        (self.elsewhere / "secret.bin").write_bytes(b"\x7f" * 4096)

    def snapshot(self) -> dict[str, tuple[str, str]]:
        """relative path -> (kind, content hash) of everything under root except out/."""
        found = {}
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == "out" or rel_dir.startswith("out" + os.sep):
                dirnames[:] = []
                continue
            for name in dirnames:
                path = os.path.join(dirpath, name)
                if os.path.islink(path):
                    found[os.path.relpath(path, self.root)] = ("link", os.readlink(path))
            for name in filenames:
                path = os.path.join(dirpath, name)
                rel = os.path.relpath(path, self.root)
                if os.path.islink(path):
                    found[rel] = ("link", os.readlink(path))
                elif os.path.isfile(path):
                    with open(path, "rb") as f:
                        found[rel] = ("file", hashlib.sha256(f.read()).hexdigest())
                else:
                    found[rel] = ("special", "")
        return found

    def clear_out(self) -> None:
        if self.out.is_symlink() or self.out.is_file():
            self.out.unlink()
        elif self.out.exists():
            shutil.rmtree(self.out)

    def write(self, name: str, data: bytes | str) -> Path:
        path = self.inputs / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_symlink() or path.exists() and not path.is_dir():
            path.unlink()
        path.write_bytes(data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data)
        return path


def _alarm(signum, frame):
    raise CaseTimeout(f"case ran longer than {CASE_SECONDS} s")


def run_cli(sandbox: Sandbox, argv: Sequence[str], kind: str) -> tuple[int, str, str]:
    """One case: run main(argv) in the sandbox and check every property; returns (code, stdout, stderr)."""
    import time

    from amct_pipeline.cli.main import main
    COUNTS[kind] = COUNTS.get(kind, 0) + 1
    if not SPAN:
        SPAN[:] = [time.perf_counter()] * 2
    before = sandbox.snapshot()
    out, err = io.StringIO(), io.StringIO()
    saved_env = os.environ.get(AUTOLOAD_ENV)
    os.environ[AUTOLOAD_ENV] = "1"      # entry-point plugins are tested elsewhere (50 ms per case here)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(CASE_SECONDS)
    cwd = os.getcwd()
    try:
        os.chdir(sandbox.cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:          # argparse usage errors
                code = exc.code if isinstance(exc.code, int) else 2
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(cwd)
        if saved_env is None:
            os.environ.pop(AUTOLOAD_ENV, None)
        else:
            os.environ[AUTOLOAD_ENV] = saved_env
    stderr = err.getvalue()
    shown = " ".join(repr(a)[:300] for a in argv)
    assert code != 3, f"internal error for argv {shown}:\n{stderr[-3000:]}"
    assert code in (0, 1, 2), f"exit status {code} for argv {shown}:\n{stderr[-3000:]}"
    if code == 1:
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert lines and all(line.startswith("amct-pipeline: ") for line in lines), \
            f"exit 1 without one-line errors for argv {shown}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr
    after = sandbox.snapshot()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"files outside the output folder changed {changed[:10]} for argv {shown}\n{stderr[-2000:]}"
    sandbox.clear_out()
    SPAN[1] = time.perf_counter()
    return code, out.getvalue(), stderr
