"""Bounded parsing of the text files and values a user hands in: YAML, JSON, TOML.

Pipeline files, ``--set`` values and AMCT's JSON configs come from anywhere, so their parsers must
not let a small input cost a lot or crash with an internal error:

* **YAML aliases cannot multiply the document.** Every value's size after alias expansion is
  counted while the document is composed (each node once); past :data:`MAX_NODES` values, or on an
  alias that refers to itself, loading stops with a located error. A 1 KB "billion laughs" file
  fails in milliseconds.
* **Nesting is bounded** (:data:`MAX_DEPTH` levels, aliases included) in YAML, JSON and TOML, so
  deep input is a located error, not a ``RecursionError``.
* **Duplicate keys are errors** naming the key and both lines (YAML, JSON; TOML's own parser
  already refuses them).
* **Only plain data.** YAML tags other than the core ones (``!!str``, ``!!int``, ...) are refused;
  ``allow_tags=False`` refuses every explicit tag (``--set`` values).
* **Text must be UTF-8**; a bad byte is reported with its line.

Every refusal is a :class:`ParseError` (a ``ValueError``) with ``message``, ``line`` and ``column``
(1-based, 0 when unknown); callers wrap it into their own located error.
"""
from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["ParseError", "MAX_DEPTH", "MAX_NODES", "decode_utf8", "load_yaml", "load_json", "load_toml",
           "check_depth"]

MAX_DEPTH = 100        # nesting levels of mappings and lists (the deepest shipped pipeline has 8)
MAX_NODES = 100_000    # values in one document after YAML alias expansion

_CORE_TAGS = frozenset("tag:yaml.org,2002:" + t for t in ("str", "int", "float", "bool", "null", "map", "seq"))


class ParseError(ValueError):
    """Input refused while parsing; ``line``/``column`` are 1-based (0: not known)."""

    def __init__(self, message: str, line: int = 0, column: int = 0) -> None:
        self.message, self.line, self.column = message, line, column
        super().__init__(f"line {line}, column {column}: {message}" if line else message)

    @property
    def where(self) -> str:
        return f"line {self.line}, column {self.column}" if self.line else ""


def decode_utf8(data: bytes) -> str:
    """``data`` as text; a byte that is not UTF-8 is a ParseError naming its line and column."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ParseError(f"not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as UTF-8",
                         line, column) from None


# -- YAML ---------------------------------------------------------------------------------------------
def _loader_class():
    import yaml
    from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent
    from yaml.nodes import MappingNode, ScalarNode, SequenceNode

    class BoundedLoader(yaml.SafeLoader):
        """SafeLoader that counts expanded values and depth while composing, and refuses duplicate keys."""

        def __init__(self, stream: str, allow_tags: bool) -> None:
            super().__init__(stream)
            self.allow_tags = allow_tags
            self.depth = 0
            self.sizes: dict[int, tuple[int, int]] = {}   # id(node) -> (expanded values, expanded depth)
            self.aliases = False

        def compose_node(self, parent, index):
            event = self.peek_event()
            mark = event.start_mark
            if isinstance(event, AliasEvent):
                self.aliases = True
                node = super().compose_node(parent, index)
                if id(node) not in self.sizes:
                    raise ParseError(f"alias '*{event.anchor}' refers to a value that contains it; "
                                     "recursive aliases are not allowed", mark.line + 1, mark.column + 1)
                return node
            if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.tag not in (None, "!"):
                if not self.allow_tags:
                    raise ParseError(f"YAML tag '{event.tag}' is not allowed here; write a plain value "
                                     "(quote it to keep the text)", mark.line + 1, mark.column + 1)
                if event.tag not in _CORE_TAGS:
                    raise ParseError(f"YAML tag '{event.tag}' is not allowed; pipeline files hold plain data "
                                     "(strings, numbers, booleans, lists, mappings)", mark.line + 1, mark.column + 1)
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise ParseError(f"nested more than {MAX_DEPTH} levels deep", mark.line + 1, mark.column + 1)
            try:
                node = super().compose_node(parent, index)
            finally:
                self.depth -= 1
            self._measure(node)
            return node

        def _measure(self, node) -> None:
            if isinstance(node, ScalarNode):
                children = []
            elif isinstance(node, SequenceNode):
                children = node.value
            else:
                children = [n for pair in node.value for n in pair]
                self._check_keys(node)
            size, depth = 1, 1
            for child in children:
                child_size, child_depth = self.sizes[id(child)]
                size, depth = size + child_size, max(depth, child_depth + 1)
            mark = node.start_mark
            if size > MAX_NODES:
                what = "YAML aliases expand the document" if self.aliases else "the document has"
                raise ParseError(f"{what} to more than {MAX_NODES} values; write the values out or simplify",
                                 mark.line + 1, mark.column + 1)
            if depth > MAX_DEPTH:
                raise ParseError(f"nested more than {MAX_DEPTH} levels deep (through aliases)",
                                 mark.line + 1, mark.column + 1)
            self.sizes[id(node)] = (size, depth)

        @staticmethod
        def _check_keys(node: MappingNode) -> None:
            seen: dict[tuple[str, str], Any] = {}
            for key, _ in node.value:
                if not isinstance(key, ScalarNode) or key.tag == "tag:yaml.org,2002:merge":
                    continue
                ident = (key.tag, key.value)
                if ident in seen:
                    first = seen[ident].start_mark
                    raise ParseError(f"duplicate key '{key.value}' (first at line {first.line + 1}); keep one",
                                     key.start_mark.line + 1, key.start_mark.column + 1)
                seen[ident] = key

    return BoundedLoader


_LOADER: list[Any] = []


def load_yaml(text: str, *, allow_tags: bool = True) -> Any:
    """One YAML document as Python data, within the limits above; any failure is a ParseError."""
    import yaml
    if not _LOADER:
        _LOADER.append(_loader_class())
    loader = None
    try:
        loader = _LOADER[0](text, allow_tags)       # the reader checks the characters here already
        return loader.get_single_data()
    except ParseError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        message = " ".join(part for part in (exc.context, exc.problem) if part) or type(exc).__name__
        raise ParseError(message, mark.line + 1 if mark else 0, mark.column + 1 if mark else 0) from None
    except yaml.YAMLError as exc:        # ReaderError (a control character) carries a position, not a mark
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise ParseError(text[:300]) from None
    except RecursionError:
        raise ParseError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        if loader is not None:
            loader.dispose()


# -- JSON ---------------------------------------------------------------------------------------------
_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:]', re.S)


def _json_position(text: str, offset: int) -> tuple[int, int]:
    line = text.count("\n", 0, offset) + 1
    return line, offset - (text.rfind("\n", 0, offset) + 1) + 1


def _scan_json(text: str) -> None:
    """Depth and duplicate keys, located; syntax is left to ``json`` (this only tracks brackets)."""
    stack: list[dict[str, int] | None] = []     # per open bracket: keys seen (objects) or None (arrays)
    previous = None
    for match in _JSON_TOKEN.finditer(text):
        token = match.group()
        if token in "{[":
            if len(stack) >= MAX_DEPTH:
                raise ParseError(f"nested more than {MAX_DEPTH} levels deep", *_json_position(text, match.start()))
            stack.append({} if token == "{" else None)
        elif token in "}]":
            if stack:
                stack.pop()
        elif token == ":":
            if previous is not None and stack and stack[-1] is not None:
                key_match = previous
                try:
                    key = json.loads(key_match.group())
                except ValueError:
                    key = key_match.group()[1:-1]
                if key in stack[-1]:
                    first = _json_position(text, stack[-1][key])[0]
                    raise ParseError(f"duplicate key '{key}' (first at line {first}); keep one",
                                     *_json_position(text, key_match.start()))
                stack[-1][key] = key_match.start()
        previous = match if token.startswith('"') else None


def load_json(text: str) -> Any:
    """``json.loads`` that refuses duplicate keys and deep nesting, both located."""
    _scan_json(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ParseError(exc.msg, exc.lineno, exc.colno) from None
    except RecursionError:
        raise ParseError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None


# -- TOML ---------------------------------------------------------------------------------------------
def load_toml(text: str) -> Any:
    """``tomllib.loads`` (which refuses duplicate keys itself) with the depth bound."""
    import tomllib
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        found = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if found:
            raise ParseError(message[:found.start()].strip(), int(found.group(1)), int(found.group(2))) from None
        raise ParseError(message) from None
    except RecursionError:
        raise ParseError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    path = check_depth(data)
    if path is not None:
        raise ParseError(f"nested more than {MAX_DEPTH} levels deep at {path}")
    return data


def check_depth(data: Any, limit: int = MAX_DEPTH) -> str | None:
    """The key path of the first place ``data`` nests deeper than ``limit`` levels, or None."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if isinstance(value, dict):
            items = [(f"{path}.{k}" if path else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        if depth > limit:
            return path or "the top level"
        stack.extend((v, depth + 1, p) for p, v in items)
    return None
