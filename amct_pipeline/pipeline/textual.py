"""The textual one-line form: ``fuse_bn,match_layers{skip_layers=[fc]},save``.

Grammar: passes separated by ``,``; options in ``{key=value key=value}``; values are bare scalars,
double-quoted strings, ``[a,b]`` lists or ``{k=v}`` mappings. Printing is canonical, so
``format(parse(text)) == text`` for any text this module printed.
"""
from __future__ import annotations

import json
import re
from typing import Any, Sequence

__all__ = ["parse_pipeline_text", "format_pipeline", "format_value", "TextSyntaxError"]

_BARE = re.compile(r"[^\s,\[\]{}=\"]+")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
MAX_DEPTH = 100   # nested lists and mappings (as in pipeline files, see amct_pipeline.safeparse)


class TextSyntaxError(ValueError):
    pass


def parse_pipeline_text(text: str) -> list[dict[str, Any]]:
    """Parse the one-line form into ``[{"pass": name, "options": {...}}, ...]``."""
    parser = _Parser(text)
    passes = [parser.pass_()]
    while parser.take(","):
        passes.append(parser.pass_())
    parser.end()
    return passes


def format_pipeline(passes: Sequence[Any]) -> str:
    """Print passes (PassSpec objects or ``{"pass":..,"options":..}`` dicts) in canonical form."""
    out = []
    for p in passes:
        name, opts = (p["pass"], p.get("options") or {}) if isinstance(p, dict) else (p.name, p.options)
        out.append(name + (_format_map(opts) if opts else ""))
    return ",".join(out)


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return _format_map(value)
    text = str(value)
    return text if _BARE.fullmatch(text) and _scalar(text) == text else json.dumps(text)


def _format_map(mapping: dict) -> str:
    return "{" + " ".join(f"{k}={format_value(v)}" for k, v in mapping.items()) + "}"


def _scalar(token: str) -> Any:
    lowered = token.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("null", "none"):
        return None
    if _NUMBER.match(token):
        return float(token) if any(c in token for c in ".eE") else int(token)
    return token


class _Parser:
    def __init__(self, text: str) -> None:
        self.text, self.pos, self.depth = text.strip(), 0, 0

    def error(self, what: str) -> TextSyntaxError:
        shown = self.text if len(self.text) <= 120 else self.text[:120] + f"... ({len(self.text)} characters)"
        return TextSyntaxError(f"{what} at column {self.pos + 1} of {shown!r}")

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"nested more than {MAX_DEPTH} levels deep")

    def skip_ws(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def take(self, char: str) -> bool:
        self.skip_ws()
        if self.text.startswith(char, self.pos):
            self.pos += 1
            return True
        return False

    def expect(self, char: str) -> None:
        if not self.take(char):
            raise self.error(f"expected '{char}'")

    def end(self) -> None:
        self.skip_ws()
        if self.pos != len(self.text):
            raise self.error("unexpected text")

    def bare(self) -> str:
        self.skip_ws()
        match = _BARE.match(self.text, self.pos)
        if not match:
            raise self.error("expected a name or value")
        self.pos = match.end()
        return match.group()

    def pass_(self) -> dict[str, Any]:
        name = self.bare()
        options = self.mapping() if self.peek("{") else {}
        return {"pass": name, "options": options}

    def peek(self, char: str) -> bool:
        self.skip_ws()
        return self.text.startswith(char, self.pos)

    def mapping(self) -> dict[str, Any]:
        self.expect("{")
        self.nest()
        result: dict[str, Any] = {}
        while not self.take("}"):
            start = self.pos
            key = self.bare()
            if key in result:
                self.pos = start
                self.skip_ws()
                raise self.error(f"duplicate key '{key}'")
            self.expect("=")
            result[key] = self.value()
            self.take(",")  # tolerate "a=1, b=2" on input; printing uses spaces
        self.depth -= 1
        return result

    def value(self) -> Any:
        if self.peek("["):
            self.expect("[")
            self.nest()
            items = []
            while not self.take("]"):
                items.append(self.value())
                self.take(",")
            self.depth -= 1
            return items
        if self.peek("{"):
            return self.mapping()
        if self.peek('"'):
            decoder = json.JSONDecoder()
            try:
                text, end = decoder.raw_decode(self.text, self.pos)
            except json.JSONDecodeError as exc:
                raise self.error(f"bad quoted string ({exc.msg})") from None
            self.pos = end
            return text
        return _scalar(self.bare())
