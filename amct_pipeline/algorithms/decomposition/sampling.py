"""Run (a prefix of) a model on cached calibration batches and hand back named activations.

Data-aware decomposition runs the partly decomposed model once or twice per layer; cutting the
model at the tensors asked for keeps each run to the layers in front of them.
"""
from __future__ import annotations

from itertools import islice
from typing import Iterator, Optional, Sequence

import numpy as np
import onnx

from ...errors import DataError

__all__ = ["CalibrationData", "prefix_model", "sqnr_db"]


def prefix_model(model: onnx.ModelProto, outputs: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` computing only ``outputs`` (graph inputs kept, so feeds stay valid)."""
    producer = {name: index for index, node in enumerate(model.graph.node) for name in node.output}
    needed: set[int] = set()
    stack = [producer[name] for name in outputs if name in producer]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producer[name] for name in model.graph.node[index].input if name in producer)
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    del cut.graph.node[:]
    cut.graph.node.extend(node for index, node in enumerate(model.graph.node) if index in needed)
    used = {name for node in cut.graph.node for name in node.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del cut.graph.initializer[:]
    cut.graph.initializer.extend(kept)
    del cut.graph.output[:]
    for name in outputs:
        cut.graph.output.add().name = name
    return cut


def sqnr_db(reference: Sequence[np.ndarray], approx: Sequence[np.ndarray]) -> float:
    """10·log10(Σ ref² / Σ (ref − approx)²) over all batches; inf when identical."""
    signal = sum(float(np.sum(np.asarray(r, np.float64) ** 2)) for r in reference)
    noise = sum(float(np.sum((np.asarray(r, np.float64) - np.asarray(a, np.float64)) ** 2))
                for r, a in zip(reference, approx))
    if noise == 0:
        return float("inf")
    return 10.0 * float(np.log10(max(signal, 1e-300) / noise))


class CalibrationData:
    """Feeds read once from a dataset, replayed for every run (datasets may be one-shot iterables)."""

    def __init__(self, source, inputs, num_batches: Optional[int] = None) -> None:
        self.name = getattr(source, "name", "data")
        batches = source.batches(inputs)
        self.feeds = list(batches if num_batches is None else islice(batches, num_batches))
        if not self.feeds:
            raise DataError(f"dataset '{self.name}' gave no batches; data-aware decomposition needs some")

    @property
    def samples(self) -> int:
        return sum(len(next(iter(feed.values()))) for feed in self.feeds)

    def run(self, model: onnx.ModelProto, names: Sequence[str]) -> Iterator[tuple[int, dict[str, np.ndarray]]]:
        """(batch index, {name: array}) for every cached batch, running only what ``names`` need."""
        from ...runtime.ort import make_session
        session = make_session(prefix_model(model, names))
        for index, feed in enumerate(self.feeds):
            yield index, dict(zip(names, session.run(list(names), feed)))
