"""Load pipelines from YAML, JSON or TOML files, mappings or the textual form."""
from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from pydantic import ValidationError

from ..errors import ConfigError, Problem
from ..options import field_names, suggest
from .spec import PipelineSpec
from .textual import TextSyntaxError, parse_pipeline_text

__all__ = ["load_pipeline", "read_pipeline_file", "apply_overrides", "spec_from_mapping", "format_loc"]

SUFFIXES = {".yaml": "yaml", ".yml": "yaml", ".json": "json", ".toml": "toml"}


def load_pipeline(source: Any, *, overrides: Sequence[str] = ()) -> PipelineSpec:
    """A pipeline from a path, a mapping, a textual one-liner or an existing spec."""
    if isinstance(source, PipelineSpec):
        data, origin, base = source.to_dict(), source.source, source.base_dir
    elif isinstance(source, Mapping):
        data, origin, base = copy.deepcopy(dict(source)), "<dict>", "."
    elif isinstance(source, (str, os.PathLike)) and _looks_like_file(source):
        data, origin = read_pipeline_file(Path(source)), str(source)
        base = str(Path(source).resolve().parent)
    elif isinstance(source, str):
        data, origin, base = _from_text(source), "<text>", "."
    else:
        raise ConfigError([Problem("<pipeline>", "", f"cannot load a pipeline from {type(source).__name__}")])
    data = apply_overrides(data, overrides, origin)
    return spec_from_mapping(data, origin, base)


def _looks_like_file(source: str | os.PathLike) -> bool:
    """Paths exist or look like one; the textual form has commas or braces (options may hold '/')."""
    text = os.fspath(source)
    if os.path.exists(text) or not isinstance(source, str):
        return True
    if any(c in text for c in ",{}"):
        return False
    return Path(text).suffix.lower() in SUFFIXES or os.path.sep in text


def _from_text(text: str) -> dict[str, Any]:
    try:
        return {"passes": parse_pipeline_text(text)}
    except TextSyntaxError as exc:
        raise ConfigError([Problem("<text>", "", str(exc))]) from None


MAX_FILE_BYTES = 16 << 20


def read_pipeline_file(path: Path) -> dict[str, Any]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise ConfigError([Problem(str(path), "", "unknown pipeline file type",
                                   "use .yaml, .yml, .json or .toml")])
    from ..files import open_regular
    from ..safeparse import ParseError, decode_utf8
    try:
        with open_regular(path, "pipeline file", ConfigError) as handle:    # a FIFO or device never blocks
            raw = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", f"cannot read: {exc.strerror or exc}")]) from None
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError([Problem(str(path), "", f"is over {MAX_FILE_BYTES >> 20} MiB; a pipeline file is a few KB")])
    try:
        data = _parse(kind, decode_utf8(raw))
    except ParseError as exc:
        raise ConfigError([Problem(str(path), exc.where, f"not valid {kind.upper()}: {exc.message}")]) from None
    except Exception as exc:  # each parser has its own error type; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError([Problem(str(path), "", f"not valid {kind.upper()}: {first}")]) from None
    if data is None:
        raise ConfigError([Problem(str(path), "", "the file is empty", "a pipeline needs at least 'passes'")])
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", "the top level must be a mapping with a 'passes' list")])
    return data


def _parse(kind: str, text: str) -> Any:
    from .. import safeparse
    if kind == "json":
        return safeparse.load_json(text)
    if kind == "toml":
        return safeparse.load_toml(text)
    return safeparse.load_yaml(text)


def spec_from_mapping(data: Mapping[str, Any], origin: str, base_dir: str = ".") -> PipelineSpec:
    try:
        return PipelineSpec.model_validate({**data, "source": origin, "base_dir": base_dir})
    except ValidationError as exc:
        raise ConfigError([_schema_problem(origin, err) for err in exc.errors()]) from None


def _schema_problem(origin: str, err: Mapping[str, Any]) -> Problem:
    loc = list(err.get("loc", ()))
    if err.get("type") == "extra_forbidden":
        known = _known_keys(loc[:-1])
        return Problem(origin, format_loc(loc), "unknown key", suggest(str(loc[-1]), known)
                       or (f"known keys: {', '.join(known)}" if known else ""))
    if err.get("type") == "literal_error" and loc == ["schema_version"]:
        return Problem(origin, "schema_version", f"unsupported schema version {err.get('input')!r}",
                       "this amct-pipeline reads schema_version 1")
    return Problem(origin, format_loc(loc), err.get("msg", "invalid value"))


def _known_keys(loc: list) -> list[str]:
    known = field_names(PipelineSpec, [p for p in loc if isinstance(p, str)])
    return [k for k in known if k not in ("source", "base_dir")]


def format_loc(loc: Sequence[Any]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ---------------------------------------------------------------------------------------------
# --set key=value overrides

_STEP = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str], origin: str = "<dict>") -> dict[str, Any]:
    """Apply ``key.path=value`` overrides; ``passes.NAME`` addresses the pass with that name."""
    problems = []
    for item in overrides:
        try:
            _apply_one(data, item)
        except ValueError as exc:
            problems.append(Problem("--set", _shorten(item), str(exc)))
    if problems:
        raise ConfigError(problems)
    return data


def _shorten(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


def _apply_one(data: dict[str, Any], item: str) -> None:
    from ..safeparse import ParseError, load_yaml
    if "=" not in item:
        raise ValueError("expected key.path=value")
    key, raw = item.split("=", 1)
    steps = [m.group(1) if m.group(1) is not None else int(m.group(2)) for m in _STEP.finditer(key.strip())]
    if not steps:
        raise ValueError("empty key path")
    try:
        value = load_yaml(raw, allow_tags=False) if raw.strip() else ""
    except ParseError as exc:
        raise ValueError(f"the value is not a plain YAML value: {exc.message}") from None
    node: Any = data
    for i, step in enumerate(steps[:-1]):
        node = _descend(node, step, steps[i - 1] if i else None)
    last = steps[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            raise ValueError(f"no list item {last!r}")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"'{steps[-2] if len(steps) > 1 else key}' is not a mapping")


def _descend(node: Any, step: Any, parent: Any) -> Any:
    if isinstance(node, list):
        if isinstance(step, int):
            if step >= len(node):
                raise ValueError(f"index {step} is past the end (there are {len(node)})")
            return node[step]
        matches = [p for p in node if isinstance(p, dict) and p.get("pass") == step]
        if len(matches) != 1:
            names = [p.get("pass") for p in node if isinstance(p, dict)]
            why = "no pass" if not matches else f"{len(matches)} passes"
            hint = suggest(step, names)
            raise ValueError(f"{why} named '{step}'" + (f"; {hint}" if hint else "; use passes[INDEX]"))
        return matches[0]
    if not isinstance(node, dict):
        raise ValueError(f"'{parent}' is not a mapping")
    return node.setdefault(step, {})
