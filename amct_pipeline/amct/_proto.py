"""Message classes for AMCT's protobuf-text formats, built at runtime from the shipped ``proto/*.proto``.

There is no protoc at build time, so this module reads the ``.proto`` files itself: a small parser
for the proto2 subset they use (package, import, message, nested enum/message, oneof, labels,
``[default = ...]``) turns them into ``FileDescriptorProto``s for a private descriptor pool. The
``.proto`` files are therefore the single source of truth, and users read exactly what we parse.
Nothing happens at import time; the pool is built on the first ``message_class`` call.
"""
from __future__ import annotations

import re
import threading
from importlib import resources
from typing import Any

from ..options import suggest
from .errors import ConfigFileError, Issue

__all__ = ["message_class", "parse_text", "parse_config_text", "ProtoTextError", "PROTO_FILES"]

# Dependency order: a file is added to the pool after the files it imports.
PROTO_FILES = ("basic_info.proto", "scale_offset_record.proto", "calibration_config.proto", "retrain_config.proto")

_TOKEN = re.compile(
    r"""\s+|//[^\n]*|/\*.*?\*/|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[\w.+-]+|[{}\[\]=;<>,()])""", re.S
)
_SCALARS = {
    "double": 1, "float": 2, "int64": 3, "uint64": 4, "int32": 5, "fixed64": 6, "fixed32": 7, "bool": 8,
    "string": 9, "bytes": 12, "uint32": 13, "sfixed32": 15, "sfixed64": 16, "sint32": 17, "sint64": 18,
}
_LABELS = {"optional": 1, "required": 2, "repeated": 3}
_TYPE_MESSAGE, _TYPE_ENUM = 11, 14

_lock = threading.Lock()
_state: dict[str, Any] = {}


class ProtoTextError(ValueError):
    """Protobuf text that does not parse; ``line``/``col`` are 1-based."""

    def __init__(self, message: str, line: int, col: int):
        super().__init__(message)
        self.message, self.line, self.col = message, line, col


def message_class(full_name: str) -> type:
    """The generated class of message ``full_name`` (e.g. ``AMCTPytorchProto.ScaleOffsetRecord``)."""
    classes = _state.get("classes")
    if classes is None or full_name not in classes:
        with _lock:
            from google.protobuf import message_factory

            pool = _state.get("pool") or _state.setdefault("pool", _build_pool())
            classes = _state.setdefault("classes", {})
            if full_name not in classes:
                classes[full_name] = message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))
    return classes[full_name]


def parse_text(text: str, full_name: str):
    """Parse protobuf text into a new ``full_name`` message with AMCT's semantics (``text_format.Merge``:
    a second ``oneof`` member overrides the earlier one), except that a non-repeated field given twice
    in one message (``batch_num: 1 batch_num: 2``) is an error: a silent "last one wins" hides edits.

    Raises ``ProtoTextError``; for an unknown field name its message suggests the closest one.
    """
    from google.protobuf import text_format

    msg = message_class(full_name)()
    try:
        text_format.Merge(text, msg)
    except text_format.ParseError as exc:
        raise ProtoTextError(_explain(exc), exc.GetLine(), exc.GetColumn()) from None
    _check_repeated_singular(text, msg.DESCRIPTOR)
    return msg


def _is_repeated(field) -> bool:
    repeated = getattr(field, "is_repeated", None)         # protobuf >= 6; ``label`` before
    return bool(repeated) if repeated is not None else field.label == field.LABEL_REPEATED


_TEXT_TOKEN = re.compile(r"""\s+|#[^\n]*|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|[\w.+-]+|[{}<>\[\]:;,])""")


def _check_repeated_singular(text: str, descriptor) -> None:
    """A ProtoTextError at the second occurrence of a non-repeated field within one message.

    Runs after ``text_format.Merge`` accepted the text, so the syntax and field names are known good;
    this only follows field names and braces (iteratively: nesting depth costs no recursion).
    """
    tokens = [(m.group(1), m.start(1)) for m in _TEXT_TOKEN.finditer(text) if m.group(1)]
    stack = [(descriptor, {})]            # (message descriptor, field name -> offset of first use)
    i = 0

    def position(offset: int) -> tuple[int, int]:
        return text.count("\n", 0, offset) + 1, offset - (text.rfind("\n", 0, offset) + 1) + 1

    while i < len(tokens):
        tok, offset = tokens[i]
        i += 1
        if tok in ("}", ">"):
            if len(stack) > 1:
                stack.pop()
            continue
        if tok in (",", ";") or tok.startswith(("[", '"', "'")):
            continue
        desc, seen = stack[-1]
        field = desc.fields_by_name.get(tok) if desc is not None else None
        if i < len(tokens) and tokens[i][0] == ":":
            i += 1
        opens = i < len(tokens) and tokens[i][0] in ("{", "<")
        if field is not None and not _is_repeated(field):
            if tok in seen:
                first = position(seen[tok])[0]
                raise ProtoTextError(f"field '{tok}' of {desc.name} is given twice (first at line {first}); "
                                     "keep one", *position(offset))
            seen[tok] = offset
        if opens:
            i += 1
            stack.append((field.message_type if field is not None else None, {}))
        elif i < len(tokens) and tokens[i][0] == "[":        # a list value: skip to its end
            depth = 0
            while i < len(tokens):
                depth += {"[": 1, "]": -1}.get(tokens[i][0], 0)
                i += 1
                if depth == 0:
                    break
        else:                                                # one scalar; adjacent strings concatenate
            i += 1
            while i < len(tokens) and tokens[i][0][:1] in ('"', "'") and tokens[i - 1][0][:1] in ('"', "'"):
                i += 1


def parse_config_text(text: str, full_name: str, source: str):
    """``parse_text`` for config files: a syntax error becomes a one-line ``ConfigFileError`` at file:line:col."""
    try:
        return parse_text(text, full_name)
    except ProtoTextError as exc:
        raise ConfigFileError([Issue(source, "", exc.message, exc.line, exc.col)]) from None


def _explain(exc: Exception) -> str:
    text = re.sub(r"^\d+:\d+ : ", "", str(exc))
    unknown = re.search(r'Message type "([\w.]+)" has no field named "(\w+)"', text)
    if unknown:
        desc = _state["pool"].FindMessageTypeByName(unknown.group(1))
        names = [f.name for f in desc.fields]
        hint = suggest(unknown.group(2), names) or f"known fields: {', '.join(names)}"
        text = f"{desc.name} has no field named '{unknown.group(2)}' ({hint})"
    return text


# --- .proto parsing -------------------------------------------------------------------------------


def _build_pool():
    from google.protobuf import descriptor_pool

    files = [_parse_file(name, (resources.files(__package__) / "proto" / name).read_text("utf-8"))
             for name in PROTO_FILES]
    kinds: dict[str, int] = {}
    for fd in files:
        _collect_types("." + fd.package if fd.package else "", fd.message_type, fd.enum_type, kinds)
    pool = descriptor_pool.DescriptorPool()
    for fd in files:
        scope = "." + fd.package if fd.package else ""
        for msg in fd.message_type:
            _resolve_types(msg, scope, kinds)
        pool.AddSerializedFile(fd.SerializeToString())
    return pool


class _Tokens:
    def __init__(self, text: str, name: str):
        self.name, self.items, pos = name, [], 0
        while pos < len(text):
            m = _TOKEN.match(text, pos)
            if not m:
                raise ValueError(f"{name}: cannot tokenize at offset {pos}: {text[pos:pos + 20]!r}")
            if m.group(1):
                self.items.append(m.group(1))
            pos = m.end()
        self.i = 0

    def peek(self) -> str | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def next(self) -> str:
        if self.i >= len(self.items):
            raise ValueError(f"{self.name}: unexpected end of file")
        self.i += 1
        return self.items[self.i - 1]

    def expect(self, tok: str) -> None:
        got = self.next()
        if got != tok:
            raise ValueError(f"{self.name}: expected {tok!r}, got {got!r}")

    def skip_statement(self) -> None:
        while self.next() != ";":
            pass


def _parse_file(name: str, text: str):
    from google.protobuf import descriptor_pb2

    fd = descriptor_pb2.FileDescriptorProto(name=name, syntax="proto2")
    toks = _Tokens(text, name)
    while toks.peek() is not None:
        kw = toks.next()
        if kw == "package":
            fd.package = toks.next()
            toks.expect(";")
        elif kw == "import":
            fd.dependency.append(toks.next().strip("\"'"))
            toks.expect(";")
        elif kw in ("syntax", "option"):
            toks.skip_statement()
        elif kw == "message":
            _parse_message(toks, fd.message_type.add())
        elif kw == "enum":
            _parse_enum(toks, fd.enum_type.add())
        else:
            raise ValueError(f"{name}: unsupported top-level statement {kw!r}")
    return fd


def _parse_message(toks: _Tokens, msg) -> None:
    msg.name = toks.next()
    toks.expect("{")
    while (tok := toks.next()) != "}":
        if tok == "message":
            _parse_message(toks, msg.nested_type.add())
        elif tok == "enum":
            _parse_enum(toks, msg.enum_type.add())
        elif tok == "oneof":
            msg.oneof_decl.add(name=toks.next())
            toks.expect("{")
            while toks.peek() != "}":
                _parse_field(toks, msg.field.add(), toks.next(), None, len(msg.oneof_decl) - 1)
            toks.next()
        elif tok in ("option", "reserved", "extensions"):
            toks.skip_statement()
        elif tok in _LABELS:
            _parse_field(toks, msg.field.add(), toks.next(), tok, None)
        else:
            raise ValueError(f"{toks.name}: unsupported statement {tok!r} in message {msg.name}")


def _parse_field(toks: _Tokens, field, type_name: str, label: str | None, oneof: int | None) -> None:
    field.name = toks.next()
    toks.expect("=")
    field.number = int(toks.next())
    field.label = _LABELS[label or "optional"]
    if type_name in _SCALARS:
        field.type = _SCALARS[type_name]
    else:
        field.type_name = type_name  # message or enum: resolved once every file is parsed
    if oneof is not None:
        field.oneof_index = oneof
    if toks.peek() == "[":
        toks.next()
        while True:
            key = toks.next()
            toks.expect("=")
            value = toks.next()
            if key == "default":
                field.default_value = value[1:-1] if value[0] in "\"'" else value
            elif key == "packed":
                field.options.packed = value == "true"
            if toks.next() == "]":
                break
    toks.expect(";")


def _parse_enum(toks: _Tokens, enum) -> None:
    enum.name = toks.next()
    toks.expect("{")
    while (tok := toks.next()) != "}":
        if tok == "option":
            toks.skip_statement()
            continue
        toks.expect("=")
        enum.value.add(name=tok, number=int(toks.next()))
        toks.expect(";")


def _collect_types(scope: str, messages, enums, kinds: dict[str, int]) -> None:
    for enum in enums:
        kinds[f"{scope}.{enum.name}"] = _TYPE_ENUM
    for msg in messages:
        kinds[f"{scope}.{msg.name}"] = _TYPE_MESSAGE
        _collect_types(f"{scope}.{msg.name}", msg.nested_type, msg.enum_type, kinds)


def _resolve_types(msg, scope: str, kinds: dict[str, int]) -> None:
    """Fully qualify type references with protobuf's scoping rule: innermost enclosing scope first."""
    scope = f"{scope}.{msg.name}"
    for field in msg.field:
        if field.type_name and not field.type_name.startswith("."):
            parts = scope.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i] + [field.type_name])
                if candidate in kinds:
                    field.type_name, field.type = candidate, kinds[candidate]
                    break
            else:
                raise ValueError(f"unknown type {field.type_name!r} in {scope[1:]}")
    for nested in msg.nested_type:
        _resolve_types(nested, scope, kinds)
