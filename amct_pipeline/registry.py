"""Name -> class registries, one per kind of contribution, owned by a Session."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Generic, Iterator, TypeVar

from .errors import PluginError, Problem
from .options import suggest

__all__ = ["Registry", "Entry", "UnknownName"]

T = TypeVar("T")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class UnknownName(LookupError):
    """A name no provider registered; message carries a did-you-mean."""


@dataclass(frozen=True)
class Entry(Generic[T]):
    name: str
    obj: T
    provider: str      # "module:QualName (distribution)" — who contributed it


class Registry(Generic[T]):
    """Keeps contributions of one kind; refuses duplicates naming both providers."""

    def __init__(self, kind: str, base: type | None = None) -> None:
        self.kind, self.base = kind, base
        self._entries: dict[str, Entry[T]] = {}

    def add(self, obj: T, *, provider: str, name: str | None = None) -> None:
        name = name or getattr(obj, "name", None)
        if not isinstance(name, str) or not _NAME.match(name):
            raise PluginError(f"{provider}: {self.kind} needs a snake_case 'name', got {name!r}")
        if self.base is not None and not (isinstance(obj, type) and issubclass(obj, self.base)):
            raise PluginError(f"{provider}: {self.kind} '{name}' must be a subclass of {self.base.__name__}")
        if name in self._entries:
            other = self._entries[name].provider
            raise PluginError(f"{self.kind} '{name}' from {provider} conflicts with the one from {other}")
        self._entries[name] = Entry(name, obj, provider)

    def get(self, name: str) -> T:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry[T]:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownName(f"unknown {self.kind} '{name}'; {self._hint(name)}") from None

    def unknown(self, name: str, source: str, path: str) -> Problem | None:
        """None when ``name`` is registered, else the located problem with a did-you-mean: the one check
        every pipeline, pass and option naming a registered thing goes through."""
        if name in self._entries:
            return None
        return Problem(source, path, f"unknown {self.kind} '{name}'", self._hint(name))

    def _hint(self, name: str) -> str:
        return suggest(name, self._entries) or f"known: {', '.join(self.names()) or 'none'}"

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[T]]:
        return iter(self._entries[n] for n in self.names())

    def __len__(self) -> int:
        return len(self._entries)
