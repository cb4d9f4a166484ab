"""What a built pipeline will use, for the CLI's warnings and notes (nothing here runs a pass)."""
from __future__ import annotations

from typing import Any, Iterable

__all__ = ["datasets_used", "unused_bindings", "python_datasets"]


def datasets_used(pipeline: Any) -> set[str]:
    """Dataset names the passes' options refer to (options a pass declares in ``references``)."""
    used: set[str] = set()
    for pass_ in pipeline.passes:
        for option, kind in getattr(type(pass_), "references", {}).items():
            if kind != "datasets":
                continue
            value = getattr(pass_.options, option, None)
            if isinstance(value, str):
                used.add(value)
            elif isinstance(value, (list, tuple)):
                used.update(v for v in value if isinstance(v, str))
    return used


def unused_bindings(pipeline: Any, names: Iterable[str]) -> list[str]:
    """Messages for ``--data NAME=PATH`` bindings that no pass reads (harmless, but likely a typo)."""
    used = datasets_used(pipeline)
    messages = []
    for name in names:
        if name in used:
            continue
        from ..options import suggest
        hint = suggest(name, sorted(used))
        listed = f"passes read {', '.join(sorted(used))}" if used else "no pass reads a dataset"
        messages.append(f"--data {name}=...: no pass uses dataset '{name}' ({listed}); the binding is ignored"
                        + (f"; {hint}" if hint else ""))
    return messages


def python_datasets(pipeline: Any, bound: Iterable[str] = ()) -> list[tuple[str, str]]:
    """(dataset name, 'module:function') for every dataset read by the ``python`` reader, which imports
    that module and calls the function. A dataset bound with ``--data`` is read as a file instead."""
    bound = set(bound)
    return [(name, data.path or "") for name, data in pipeline.spec.datasets.items()
            if data.reader == "python" and name not in bound]


def imported_code(pipeline: Any) -> list[tuple[str, str]]:
    """(pass name, 'module:Class') for every option naming code a pass imports and runs (the
    ``auto_calibrate`` evaluator), so ``validate`` can say so as it does for the ``python`` reader."""
    return [(p.name, p.options.evaluator) for p in pipeline.passes
            if isinstance(getattr(p.options, "evaluator", None), str)]
