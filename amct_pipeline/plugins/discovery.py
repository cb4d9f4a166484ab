"""Entry-point plugins from the installed environment only.

``python -m amct_pipeline`` puts the working directory first on ``sys.path``, and
``importlib.metadata`` searches ``sys.path``: a ``*.dist-info`` folder (or an ``.egg-info``) lying in
an untrusted folder would be found as an installed distribution and its entry point imported and
run. Here distributions are searched on ``sys.path`` without ``''``, ``'.'`` and the working
directory, and a plugin module is imported with those entries removed, so neither the plugin list
nor a plugin's module can come from the folder a user happens to run in.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

__all__ = ["trusted_path", "without_cwd_on_path", "entry_points", "installed_plugin_names"]


def _is_cwd(entry: str, cwd: str) -> bool:
    if entry in ("", "."):
        return True
    try:
        return os.path.realpath(entry) == cwd
    except (OSError, ValueError):
        return False


def trusted_path() -> list[str]:
    """``sys.path`` without the working directory (however it is spelt)."""
    try:
        cwd = os.path.realpath(os.getcwd())
    except OSError:           # the working directory was removed
        cwd = None
    return [p for p in sys.path if isinstance(p, str) and not (cwd is None and p in ("", "."))
            and not (cwd is not None and _is_cwd(p, cwd))]


@contextlib.contextmanager
def without_cwd_on_path() -> Iterator[None]:
    """Import with the working directory taken off ``sys.path`` (restored afterwards)."""
    saved = list(sys.path)
    sys.path[:] = trusted_path()
    try:
        yield
    finally:
        sys.path[:] = saved


def entry_points(group: str) -> list[tuple[Any, Any]]:
    """(entry point, distribution) of ``group`` in the installed environment, first distribution of a
    name wins (as ``importlib.metadata.entry_points`` does)."""
    import importlib.metadata
    found, seen = [], set()
    for dist in importlib.metadata.distributions(path=trusted_path()):
        try:
            name = dist.metadata["name"] or ""
        except Exception:      # a broken METADATA file: skip the distribution rather than fail
            continue
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        try:
            eps = list(dist.entry_points)
        except Exception:
            continue
        found += [(ep, dist) for ep in eps if ep.group == group]
    return found


def installed_plugin_names(group: str) -> list[str]:
    return sorted({ep.name for ep, _ in entry_points(group)})
