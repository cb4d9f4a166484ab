import os
import sys


def _drop_working_directory() -> None:
    """``python -m`` puts the working directory first on sys.path: an untrusted folder must not shadow
    the modules (or provide the plugin distributions) the CLI imports from here on. Done before any
    other import; the same rule is applied to plugin discovery (amct_pipeline/plugins/discovery.py)."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:
        cwd = None
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and (cwd is None or os.path.realpath(p) != cwd)]


_drop_working_directory()

from .cli.main import main  # noqa: E402

sys.exit(main())
