"""The layer rules of the README's "Design" section, as import-linter contracts (pyproject.toml).

A violation fails the suite with import-linter's report: which contract, which import, which line.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("importlinter", reason="import-linter is in the 'test' extra: pip install '.[test]'")


def test_import_contracts_hold():
    # run from the repository root so that the amct_pipeline analysed is this checkout's
    done = subprocess.run([sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                           "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", str(ROOT / "pyproject.toml")],
                          cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout
