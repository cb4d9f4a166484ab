"""Option models: pydantic models that reject unknown keys, with did-you-mean hints."""
from __future__ import annotations

import difflib
from typing import Any, Iterable, Mapping

from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = ["Options", "NoOptions", "parse_options", "suggest", "OptionProblem", "field_names"]


class Options(BaseModel):
    """Base class of every options model: frozen, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class NoOptions(Options):
    """A pass or algorithm that takes no options."""


def suggest(word: str, choices: Iterable[str]) -> str:
    """``did you mean 'x'?`` for the closest choice, or an empty string when nothing is close.

    The one did-you-mean of the package (pipelines, options, registries, AMCT files): the closest
    spelling, else a choice the word abbreviates (``arq`` for ``arq_quantize``).
    """
    word, choices = str(word), [str(c) for c in choices]
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if not close and len(word) >= 3:
        close = [c for c in choices if c.startswith(word)][:1]
    return f"did you mean '{close[0]}'?" if close else ""


class OptionProblem(tuple):
    """(key path relative to the options mapping, message, hint)."""

    __slots__ = ()

    def __new__(cls, path: str, message: str, hint: str = ""):
        return super().__new__(cls, (path, message, hint))

    path = property(lambda self: self[0])
    message = property(lambda self: self[1])
    hint = property(lambda self: self[2])


def parse_options(model: type[Options], values: Mapping[str, Any] | None) -> tuple[Options | None, list[OptionProblem]]:
    """Validate ``values`` against ``model``; return the instance or every problem found."""
    try:
        return model.model_validate(dict(values or {})), []
    except ValidationError as exc:
        return None, [_problem(model, err) for err in exc.errors()]


def _problem(model: type[Options], err: Mapping[str, Any]) -> OptionProblem:
    loc = [str(p) for p in err.get("loc", ())]
    path = ".".join(loc)
    if err.get("type") == "extra_forbidden":
        fields = field_names(model, loc[:-1])
        allowed = ", ".join(sorted(fields)) or "none"
        hint = suggest(loc[-1], fields) or f"known options: {allowed}"
        return OptionProblem(path, "unknown option", hint)
    return OptionProblem(path, err.get("msg", "invalid value"), "")


def field_names(model: type[BaseModel], loc: list[str]) -> list[str]:
    """Keys accepted by the (possibly nested) model at ``loc``; used for did-you-mean hints."""
    current: Any = model
    for part in loc:
        fields = getattr(current, "model_fields", None) or {}
        if part not in fields:
            break
        annotation = fields[part].annotation
        nested = [a for a in _flatten_args(annotation) if hasattr(a, "model_fields")]
        current = nested[0] if nested else None
    fields = getattr(current, "model_fields", None) or {}
    return [f.alias or name for name, f in fields.items()]


def _flatten_args(annotation: Any) -> list[Any]:
    out = [annotation]
    for arg in getattr(annotation, "__args__", ()) or ():
        out.extend(_flatten_args(arg))
    return out
