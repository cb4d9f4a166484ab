"""Helpers shared by the AMCT format readers: problem collection, typed look-ups, hints, atomic writes."""
from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections import Counter
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from ..options import suggest
from .errors import ConfigFileError, Issue

__all__ = [
    "Problems", "show", "num", "f32", "layer_types", "atomic_write_text", "read_text",
    "get", "unknown_keys", "check_range", "check_choice", "check_names", "check_types", "load_json", "LayerSpec",
]

# (name, op_type) pairs, a {name: op_type} mapping, or objects with ``name``/``op_type`` attributes.
LayerSpec = Iterable[Any] | Mapping[str, str]

_KIND_TEXT = {
    "bool": "a boolean (true or false)", "int": "an integer", "number": "a number", "str": "a string",
    "list": "a list", "dict": "an object",
}


class Problems:
    """Collects every problem of one file so the user sees them all at once."""

    def __init__(self, source: str):
        self.source, self.issues = source, []

    def add(self, where: str, message: str) -> None:
        issue = Issue(self.source, where, message)
        if issue not in self.issues:  # a shared setting (common_config) can fail once per layer
            self.issues.append(issue)

    def __bool__(self) -> bool:
        return bool(self.issues)

    def raise_if_any(self) -> None:
        if self.issues:
            raise ConfigFileError(self.issues)


def show(value: Any) -> str:
    """A value as the user wrote it (JSON spelling: true, "text", 0.7)."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def num(x: float) -> str:
    """A bound for messages: ``0.6`` rather than ``0.6000000000000001``."""
    return f"{round(x, 12):g}"


def f32(x: float) -> float:
    """A protobuf ``float`` as the shortest Python float that names it (0.7, not 0.699999988...)."""
    return float(str(np.float32(x)))


def layer_types(layers: LayerSpec) -> dict[str, str]:
    """Normalize the caller's layer list to an ordered ``{name: op_type}``."""
    if isinstance(layers, Mapping):
        pairs = list(layers.items())
    else:
        pairs = [(x.name, x.op_type) if hasattr(x, "op_type") else tuple(x) for x in layers]
    dupes = [n for n, c in Counter(n for n, _ in pairs).items() if c > 1]
    if dupes:
        raise ValueError(f"layer names must be unique, repeated: {', '.join(map(repr, dupes))}")
    return {str(n): str(t) for n, t in pairs}


def read_text(path: str | os.PathLike) -> str:
    """The file as UTF-8 text; a byte that is not UTF-8 is a ConfigFileError at file:line:col."""
    from ..safeparse import ParseError, decode_utf8
    with open(path, "rb") as f:
        data = f.read()
    try:
        return decode_utf8(data)
    except ParseError as exc:
        raise ConfigFileError([Issue(os.fspath(path), "", exc.message, exc.line, exc.column)]) from None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write via a temporary file in the same directory and ``os.replace``: readers never see half a file."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def load_json(text: str, source: str) -> Any:
    """``json.loads`` that reports syntax errors with line/column and refuses repeated keys and deep nesting."""
    from ..safeparse import ParseError
    from ..safeparse import load_json as bounded_load_json
    try:
        return bounded_load_json(text)
    except ParseError as exc:
        message = exc.message
        if message.startswith("duplicate key"):
            message = re.sub(r"^duplicate key '(.*)' \(first at line (\d+)\); keep one$",
                             r"key '\1' appears more than once (first at line \2); keep one", message, flags=re.S)
        else:
            message = f"invalid JSON: {message}"
        raise ConfigFileError([Issue(source, "", message, exc.line or None, exc.column or None)]) from None


_MISSING = object()


def get(p: Problems, obj: Mapping[str, Any], key: str, where: str, kind: str, default: Any = None) -> Any:
    """``obj[key]`` if it has JSON type ``kind``; ``default`` when absent or (after a reported problem) wrong."""
    value = obj.get(key, _MISSING)
    if value is _MISSING:
        return default
    ok = {
        "bool": isinstance(value, bool),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, (int, float)) and not isinstance(value, bool),
        "str": isinstance(value, str),
        "list": isinstance(value, list),
        "dict": isinstance(value, dict),
    }[kind]
    if kind == "number" and ok and not math.isfinite(value):
        ok = False
    if not ok:
        p.add(f"{where}.{key}" if where else key, f"must be {_KIND_TEXT[kind]}, got {show(value)}")
        return default
    return float(value) if kind == "number" else value


def unknown_keys(p: Problems, obj: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    allowed = list(allowed)
    for key in obj:
        if key not in allowed:
            hint = suggest(key, allowed) or f"allowed keys: {', '.join(allowed)}"
            p.add(f"{where}.{key}" if where else key, f"unknown key ({hint})")


def check_range(p: Problems, where: str, value: float, lo: float, hi: float,
                lo_open: bool = True, hi_open: bool = False) -> bool:
    inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not inside:
        bounds = f"{'(' if lo_open else '['}{num(lo)}, {num(hi)}{')' if hi_open else ']'}"
        p.add(where, f"must be in {bounds}, got {show(value)}")
    return inside


def check_choice(p: Problems, where: str, value: Any, choices: Iterable[Any]) -> bool:
    choices = list(choices)
    if value in choices:
        return True
    hint = suggest(value, choices) if isinstance(value, str) else ""
    listed = ", ".join(show(c) for c in choices)
    p.add(where, f"must be one of {listed}, got {show(value)}" + (f" ({hint})" if hint else ""))
    return False


def check_names(p: Problems, where: str, names: Iterable[str], types: Mapping[str, str],
                allowed_types: Iterable[str] | None, what: str = "layer",
                label: Callable[[int], str] | None = None) -> list[str]:
    """Report repeated, unknown (with did-you-mean) and wrong-type layer names; return the good ones."""
    names, allowed, good = list(names), None if allowed_types is None else set(allowed_types), []
    counts = Counter(names)
    for i, name in enumerate(names):
        at = label(i) if label else f"{where}[{i}]"
        if counts[name] > 1 and names.index(name) == i:
            p.add(where, f"{what} '{name}' is listed {counts[name]} times; list it once")
        if name not in types:
            hint = suggest(name, types) or "not in the model"
            p.add(at, f"unknown {what} '{name}' ({hint})")
        elif allowed is not None and types[name] not in allowed:
            p.add(at, f"{what} '{name}' is a {types[name]}; only {', '.join(sorted(allowed))} layers are allowed here")
        else:
            good.append(name)
    return good


def check_types(p: Problems, where: str, op_types: list[str], allowed: tuple[str, ...],
                verb: str, adjective: str) -> list[str]:
    """Report repeated and unsupported op types; return the good ones."""
    good = []
    for i, op_type in enumerate(op_types):
        if op_types.index(op_type) != i:
            p.add(where, f"layer type '{op_type}' is listed more than once; list it once")
        elif op_type not in allowed:
            hint = suggest(op_type, allowed) or f"{adjective} types: {', '.join(allowed)}"
            p.add(f"{where}[{i}]", f"layer type '{op_type}' cannot be {verb} ({hint})")
        else:
            good.append(op_type)
    return good
