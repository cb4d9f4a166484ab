"""Stream intermediate activations of a float model, one batch at a time.

``collect`` runs the model in ONE onnxruntime session with the wanted tensors exposed as extra
outputs and yields ``{tensor name: array}`` per batch. It never holds more than one batch: the dict
it yields is emptied when the next batch is asked for, so a caller that does not keep its own
references frees each batch before the next one is computed. A wanted tensor that is a graph input
comes straight from the feed (onnxruntime would refuse it as an output).
"""
from __future__ import annotations

import itertools
import sys
from typing import Any, Iterator, Sequence

import numpy as np
import onnx

from ..errors import CalibrationError
from .data import ActivationSource, DataSource, model_inputs

__all__ = ["collect", "planned_batches", "CollectPlan"]


class CollectPlan:
    """What one collection run reads: the model inputs and how many batches (None = all there are)."""

    def __init__(self, inputs, num_batches: int | None, total: int | None) -> None:
        self.inputs, self.num_batches, self.total = inputs, num_batches, total


def planned_batches(graph, source: DataSource, num_batches: int | None) -> CollectPlan:
    """Check ``num_batches`` against what the dataset says it yields, before any model runs."""
    inputs = model_inputs(graph)
    available = source.num_batches(inputs)
    if num_batches is not None and available is not None and available < num_batches:
        raise CalibrationError(f"dataset '{source.name}' yields {available} batches, "
                               f"batch_num asks for {num_batches}")
    return CollectPlan(inputs, num_batches, num_batches if num_batches is not None else available)


def collect(graph, source: DataSource, tensor_names: Sequence[str], num_batches: int | None = None, *,
            progress: bool = False, desc: str = "collect", model: onnx.ModelProto | None = None,
            ) -> Iterator[dict[str, np.ndarray]]:
    """Yield ``{tensor: activation}`` for each of ``num_batches`` batches (None: every batch).

    ``graph`` is the current float graph (``model`` may pass its already exported proto). Raises
    ``CalibrationError`` when the dataset runs out before ``num_batches``; data errors
    (``DataError``: wrong shape or dtype, naming the input and both shapes) come from the reader.
    """
    names = list(dict.fromkeys(tensor_names))
    if isinstance(source, ActivationSource):     # computed by another session (the user's): nothing to run
        yield from source.activations(names, num_batches)
        return
    plan = planned_batches(graph, source, num_batches)
    feed_names = {i.name for i in plan.inputs}
    fetch = [n for n in names if n not in feed_names]
    session = _session(graph if model is None else model, fetch)
    batches = source.batches(plan.inputs)
    if num_batches is not None:
        batches = itertools.islice(batches, num_batches)
    seen = 0
    with _progress_bar(plan.total, desc, progress) as bar:
        for feed in batches:
            out = dict(zip(fetch, session.run(fetch, feed))) if fetch else {}
            out.update((n, feed[n]) for n in names if n in feed_names)
            del feed
            seen += 1
            yield out
            out.clear()   # the caller's reference is this dict: its arrays go before the next run
            bar.update(1)
    if num_batches is not None and seen < num_batches:
        raise CalibrationError(f"dataset '{source.name}' yields {seen} batches, batch_num asks for {num_batches}")
    if seen == 0:
        raise CalibrationError(f"dataset '{source.name}' yields no batch")


def _session(graph_or_model: Any, fetch: Sequence[str]):
    """A session without onnxruntime's memory pattern: with many large outputs the pattern planned on
    the first run is allocated on top of the first run's buffers from the second run on (MobileNetV2,
    batch 16: +400 MB peak), and planning it buys no speed here."""
    from .ort import expose_tensors, make_session
    model = graph_or_model if isinstance(graph_or_model, onnx.ModelProto) else graph_or_model.to_proto()
    exposed = expose_tensors(model, fetch) if fetch else model
    return make_session(exposed, memory_pattern=False)


def _progress_bar(total: int | None, desc: str, enabled: bool):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="batch", disable=not enabled, file=sys.stderr, leave=False)
