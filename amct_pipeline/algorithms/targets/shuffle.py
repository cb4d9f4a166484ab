"""Channel shuffles as Gathers, for the QDQ target.

ShuffleNet's channel shuffle is ``Reshape [N, g, C/g, H, W] -> Transpose [0, 2, 1, 3, 4] -> Reshape
[N, C, H, W]``: a fixed permutation of the channels, i.e. ``Gather(x, perm, axis=1)``. onnxruntime
runs both on uint8 codes, but the 5-D Transpose costs a full copy on its own, and the Split that
usually follows costs another; one Gather per Split output (its slice of the permutation) does the
shuffle and the split in one copy. The rewrite selects exactly the same values (outputs identical),
measured 4-5% less CPU time on the ShuffleNetV2-style detector at batch 1 and 8 (benchmarks/README.md).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...ir.constants import constant_values
from ...ir.edit import Namer, add_node, constant

__all__ = ["gather_channel_shuffles", "shuffle_permutation"]


def shuffle_permutation(channels: int, groups: int) -> np.ndarray:
    """Output channel j of the shuffle reads input channel ``perm[j]``."""
    j = np.arange(channels)
    return (j % groups) * (channels // groups) + j // groups


def gather_channel_shuffles(graph, keep: frozenset[str] = frozenset()) -> int:
    """Replace every channel shuffle of ``graph`` (and the channel Split reading it) by Gathers; nodes
    named in ``keep`` are left alone. Returns how many shuffles were replaced."""
    found = [match for match in (_shuffle(graph, node) for node in graph.nodes) if match]
    if not found:
        return 0
    shapes = _channel_counts(graph, [first.inputs[0] for first, *_ in found])
    namer, count = Namer(graph), 0
    for first, transpose, last, groups in found:
        channels = shapes.get(first.inputs[0].name)
        if (channels is None or channels % groups or {first.name, transpose.name, last.name} & keep
                or not _is_channel_shuffle(first, last, channels, groups)):
            continue
        _replace(graph, namer, first, transpose, last, shuffle_permutation(channels, groups), keep)
        count += 1
    return count


def _shuffle(graph, first: gs.Node):
    """(Reshape, Transpose, Reshape, groups) when ``first`` starts the pattern, else None."""
    if first.op != "Reshape" or len(first.outputs[0].outputs) != 1 or graph.is_graph_output(first.outputs[0]):
        return None
    transpose = first.outputs[0].outputs[0]
    if transpose.op != "Transpose" or list(transpose.attrs.get("perm", [])) != [0, 2, 1, 3, 4]:
        return None
    if len(transpose.outputs[0].outputs) != 1 or graph.is_graph_output(transpose.outputs[0]):
        return None
    last = transpose.outputs[0].outputs[0]
    shape = constant_values(first.inputs[1]) if len(first.inputs) > 1 else None
    if last.op != "Reshape" or shape is None or np.size(shape) != 5 or int(np.asarray(shape)[1]) <= 1:
        return None
    return first, transpose, last, int(np.asarray(shape)[1])


def _is_channel_shuffle(first: gs.Node, last: gs.Node, channels: int, groups: int) -> bool:
    """[N, C, H, W] -> [N, g, C/g, H, W] -> ... -> [N, C, H, W] with H, W kept (the shapes as written)."""
    split_shape = np.asarray(constant_values(first.inputs[1])).reshape(-1)
    joined = constant_values(last.inputs[1]) if len(last.inputs) > 1 else None
    if joined is None or np.size(joined) != 4 or first.attrs.get("allowzero", 0) or last.attrs.get("allowzero", 0):
        return False
    joined = np.asarray(joined).reshape(-1)
    spatial = first.inputs[0].shape[2:] if first.inputs[0].shape is not None else None
    return (split_shape[0] in (0, -1) and split_shape[2] == channels // groups and joined[0] in (0, -1)
            and joined[1] == channels and spatial is not None and len(spatial) == 2
            and list(split_shape[3:]) == list(spatial) and list(joined[2:]) == list(spatial))


def _replace(graph, namer: Namer, first: gs.Node, transpose: gs.Node, last: gs.Node, perm: np.ndarray,
             keep: frozenset[str]) -> None:
    """One Gather per output of a channel Split reading the shuffle (only reader), else one Gather."""
    source, shuffled = first.inputs[0], last.outputs[0]
    pieces = _split_pieces(graph, shuffled, len(perm), keep)
    if pieces is None:
        pieces, split = [(shuffled, perm)], None
    else:
        split = shuffled.outputs[0]
        pieces = list(zip(split.outputs, np.split(perm, np.cumsum(pieces)[:-1])))
    for node in (first, transpose, last) + ((split,) if split is not None else ()):
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
    for index, (output, indices) in enumerate(pieces):
        add_node(graph, namer, "Gather", f"{first.name}.gather{index}",
                 [source, constant(namer, f"{first.name}.indices{index}", indices.astype(np.int64))], [output], axis=1)


def _split_pieces(graph, shuffled: gs.Tensor, channels: int, keep: frozenset[str]) -> list[int] | None:
    """Sizes of the channel Split that alone reads ``shuffled``, or None."""
    if len(shuffled.outputs) != 1 or graph.is_graph_output(shuffled):
        return None
    split = shuffled.outputs[0]
    if split.op != "Split" or split.name in keep or split.attrs.get("axis", 0) not in (1, -3):
        return None
    if len(split.inputs) > 1 and split.inputs[1].name:
        sizes = constant_values(split.inputs[1])
    elif "split" in split.attrs:
        sizes = split.attrs["split"]
    else:
        sizes = [channels // len(split.outputs)] * len(split.outputs) if channels % len(split.outputs) == 0 else None
    if sizes is None or int(np.sum(sizes)) != channels:
        return None
    return [int(s) for s in np.asarray(sizes).reshape(-1)]


def _channel_counts(graph, tensors: list[gs.Tensor]) -> dict[str, int]:
    """Channel counts (dim 1) of ``tensors``, from the graph's shapes or, when some are unknown, from
    onnx shape inference on an export of the graph (spatial dims are copied onto the tensors)."""
    if any(_dims(t) is None for t in tensors):
        inferred = onnx.shape_inference.infer_shapes(graph.to_proto(), strict_mode=False)
        known = {v.name: v.type.tensor_type.shape for v in list(inferred.graph.value_info) + list(inferred.graph.input)}
        for tensor in tensors:
            shape = known.get(tensor.name)
            if _dims(tensor) is None and shape is not None and len(shape.dim) == 4:
                tensor.shape = [d.dim_value if d.HasField("dim_value") else None for d in shape.dim]
    return {t.name: int(_dims(t)[1]) for t in tensors if _dims(t) is not None}


def _dims(tensor: gs.Tensor):
    """The tensor's 4-D shape when its channel and spatial sizes are known, else None."""
    shape = tensor.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape[1:]):
        return None
    return shape
