"""Channel padding of depthwise blocks, for the QDQ target.

onnxruntime's integer depthwise and 1x1 kernels (NHWC) are 2-2.5x faster when the channel count is a
multiple of 16 than at ShuffleNetV2's 58 / 116 / 232 (measured: a 3x3 depthwise QLinearConv on
[8, 58, 40, 40] takes 1.2 ms, on 64 channels 0.5 ms; benchmarks/README.md). A depthwise conv between
two ordinary convs (``A -> depthwise -> C``, e.g. a ShuffleNet / MobileNet block) can be widened at
no cost in exactness: A gets zero weight rows and zero biases for the extra channels, so they hold
exact zeros (code = zero point) through the Q/DQ pairs and Relu/Clip between; the depthwise conv
gets zero filters; C gets zero weight columns, so its outputs are unchanged. A channel Gather (a
shuffle, see ``shuffle.py``) read only by convs repeats its first index up to the multiple; plain
convs ignore the copies through zero weight columns, a depthwise conv gets zero filters for them
(and the conv after it zero columns). Every real output is bit-identical.

Likewise a conv reading 3 channels (an RGB stem) runs 1.7-2.5x faster on 4: its codes get a fourth
channel of zero points (a uint8 Pad before the DequantizeLinear, so no Q/DQ is added) and its weights a
zero column. (1 channel, e.g. super-resolution's luma input, is no faster padded to 4 zero channels.)
A conv reading 1 channel (a luma / grayscale stem) is the slowest integer conv onnxruntime runs: with
fewer than 4 input channels it leaves the fast symmetric kernel for im2col + GEMM (super-resolution's
5x5, 1 -> 64 at 224 x 224: 4x slower than the float conv). Its codes become 4 channels holding the
input shifted by 0-3 columns (uint8 Pad, four Slices, one Concat: no Q/DQ added) and the kernel
``kh x kw`` becomes ``kh x ceil(kw / 4)`` over those 4 channels with 4x the column dilation (tap
``b`` of the row is channel ``b % 4``, column ``b // 4``; the missing taps are zero weights): the same
products summed in integers, so the outputs are bit-identical, on the fast kernel (2.2x faster
there).
A conv with fewer than 16 output channels (super-resolution's last conv: 9) runs about twice as fast
widened to 16 with zero filters; a uint8 Slice on its codes (between its QuantizeLinear and
DequantizeLinear) gives the readers the real channels back. Kernel times: ``python benchmarks/qdq_channels.py``.

The rewrites of codes apply to 8-bit codes only: 16-bit layers run float kernels (nothing to gain), and
onnxruntime has no 16-bit Pad.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ...ir.constants import constant_values
from ...ir.edit import Namer, constant

__all__ = ["pad_depthwise_blocks", "pad_rgb_inputs", "pad_narrow_outputs", "shift_single_channel_inputs"]

ELEMENTWISE = ("QuantizeLinear", "DequantizeLinear", "Relu", "Clip")     # per-tensor: channel count free


def pad_depthwise_blocks(graph, multiple: int) -> int:
    """Widen every ``conv -> depthwise -> conv`` block of ``graph``, and every channel Gather read
    only by convs, to a multiple of ``multiple`` channels (see the module doc). Returns how many
    blocks and Gathers were widened."""
    graph.gs.cleanup(remove_unused_graph_inputs=False)       # dead readers (folded Relus) would block the walk
    namer, count = Namer(graph), 0
    for node in list(graph.nodes):
        block = _block(graph, node, multiple)
        if block is None:
            continue
        first, depthwise, last, inner = block
        channels = _weight_shape(depthwise)[0]
        size = -(-channels // multiple) * multiple
        _widen(first, 0, size, namer)
        _widen(depthwise, 0, size, namer)
        _pad_parameter(last, 1, 1, size, namer)
        depthwise.attrs["group"] = size
        for tensor in inner:
            tensor.shape = None                 # the written shapes had the old channel count
        count += 1
    for node in list(graph.nodes):            # then the channel Gathers feeding (widened) convs
        count += _pad_gather(graph, node, multiple, namer)
    return count


def _block(graph, depthwise: gs.Node, multiple: int):
    """(first conv, depthwise conv, last conv, tensors between them) or None."""
    if depthwise.op != "Conv" or _weight_shape(depthwise) is None:
        return None
    channels = _weight_shape(depthwise)[0]
    if int(depthwise.attrs.get("group", 1)) != channels or _weight_shape(depthwise)[1] != 1 or channels % multiple == 0:
        return None
    up = _walk_up(graph, depthwise.inputs[0])
    down = _conv_after(graph, depthwise, channels)
    if up is None or down is None:
        return None
    (first, above), (last, below) = up, down
    if not (_plain_conv(first) and _weight_shape(first)[0] == channels and first.outputs[0] in above):
        return None
    if not all(_parameters_paddable(conv) for conv in (first, depthwise, last)):
        return None
    return first, depthwise, last, above + below


def _plain_conv(node: gs.Node | None) -> bool:
    return node is not None and node.op == "Conv" and int(node.attrs.get("group", 1)) == 1 and \
        _weight_shape(node) is not None


def _walk_up(graph, tensor: gs.Tensor):
    """From a conv's input back through single-reader per-tensor ops: (producer, tensors passed)."""
    passed = []
    while True:
        if len(tensor.outputs) != 1 or graph.is_graph_output(tensor):
            return None
        passed.append(tensor)
        node = graph.producer(tensor)
        if node is None or node.op not in ELEMENTWISE:
            return node, passed
        if not _per_tensor(node):
            return None
        tensor = node.inputs[0]


def _walk_down(graph, tensor: gs.Tensor):
    """From a conv's output forward through single-reader per-tensor ops: (reader, tensors passed)."""
    passed = []
    while True:
        if len(tensor.outputs) != 1 or graph.is_graph_output(tensor):
            return None
        passed.append(tensor)
        node = tensor.outputs[0]
        if node.op not in ELEMENTWISE:
            return node, passed
        if not _per_tensor(node) or node.inputs[0] is not tensor:
            return None
        tensor = node.outputs[0]


def _conv_after(graph, depthwise: gs.Node, channels: int):
    """(the plain conv reading ``depthwise``'s ``channels`` outputs through per-tensor ops, tensors
    passed) or None."""
    down = _walk_down(graph, depthwise.outputs[0])
    if down is None:
        return None
    last, below = down
    if not (_plain_conv(last) and last.inputs[0] is below[-1] and _weight_shape(last)[1] == channels):
        return None
    return last, below


def _per_tensor(node: gs.Node) -> bool:
    """Scalar factors / bounds: the op treats every channel alike."""
    values = [constant_values(t) for t in node.inputs[1:] if t.name]
    return all(v is not None and np.size(v) == 1 for v in values)


def _parameter(tensor: gs.Tensor):
    """(constant holding the values along the padded axes, DequantizeLinear node or None)."""
    if isinstance(tensor, gs.Constant):
        return tensor, None
    node = tensor.inputs[0] if tensor.inputs else None
    if (node is not None and node.op == "DequantizeLinear" and len(tensor.outputs) == 1
            and all(isinstance(t, gs.Constant) for t in node.inputs if t.name)):
        return node.inputs[0], node
    return None, None


def _parameters_paddable(conv: gs.Node) -> bool:
    """The conv's weight and bias (when it has one) can be padded / cut."""
    return all(_paddable(conv, i) for i in (1, 2) if i < len(conv.inputs) and conv.inputs[i].name)


def _paddable(conv: gs.Node, index: int) -> bool:
    values, _ = _parameter(conv.inputs[index])
    if values is None:
        return False
    packed = getattr(getattr(values, "_values", None), "tensor", None)       # INT4 (LazyValues): left alone
    return (packed is None or packed.data_type != onnx.TensorProto.INT4) and constant_values(values) is not None


def _weight_shape(conv: gs.Node):
    if len(conv.inputs) < 2:
        return None
    values, _ = _parameter(conv.inputs[1])
    return None if values is None else tuple(values.shape)


def _padded(values: np.ndarray, axis: int, size: int, mode: str = "zeros") -> np.ndarray:
    values = np.asarray(values)
    widths = [(0, 0)] * values.ndim
    widths[axis] = (0, size - values.shape[axis])
    return np.pad(values, widths, mode="edge" if mode == "edge" else "constant")


def _pad_parameter(conv: gs.Node, index: int, axis: int, size: int, namer: Namer) -> None:
    """Zero rows (axis 0) or columns (axis 1) up to ``size``; a per-channel DequantizeLinear along the
    padded axis repeats its first scale (any positive value; the codes are zero) and zero point 0."""
    values, dequantize = _parameter(conv.inputs[index])
    padded = constant(namer, f"{values.name}_padded", _padded(constant_values(values), axis, size))
    if dequantize is None:
        conv.inputs[index] = padded
        return
    dequantize.inputs[0] = padded
    scale = constant_values(dequantize.inputs[1])
    if np.size(scale) > 1 and int(dequantize.attrs.get("axis", 1)) == axis:
        dequantize.inputs[1] = constant(namer, f"{dequantize.inputs[1].name}_padded", _padded(scale, 0, size, "edge"))
        if len(dequantize.inputs) > 2 and dequantize.inputs[2].name:
            zero = constant_values(dequantize.inputs[2])
            dequantize.inputs[2] = constant(namer, f"{dequantize.inputs[2].name}_padded", _padded(zero, 0, size))


def _pad_gather(graph, gather: gs.Node, multiple: int, namer: Namer) -> bool:
    """A channel Gather whose readers (through per-tensor ops) are all convs that can take extra
    channels: it repeats its first index up to ``multiple``; a plain conv gets zero weight columns for
    the copies, a depthwise conv zero filters and the plain conv after it zero columns."""
    indices = constant_values(gather.inputs[1]) if gather.op == "Gather" and len(gather.inputs) > 1 else None
    if indices is None or np.ndim(indices) != 1 or int(gather.attrs.get("axis", 0)) != 1 or len(indices) % multiple == 0:
        return False
    count, tensor, passed = len(indices), gather.outputs[0], []
    while not graph.is_graph_output(tensor):
        passed.append(tensor)
        node = tensor.outputs[0] if len(tensor.outputs) == 1 else None
        if node is None or node.op not in ELEMENTWISE or node.inputs[0] is not tensor or not _per_tensor(node):
            break
        tensor = node.outputs[0]
    else:
        return False
    plans = [_reader_plan(graph, reader, tensor, count) for reader in tensor.outputs]
    if not plans or any(plan is None for plan in plans):
        return False
    size = -(-count // multiple) * multiple
    repeated = np.concatenate([indices, np.full(size - count, indices[0], dtype=np.asarray(indices).dtype)])
    gather.inputs[1] = constant(namer, f"{gather.inputs[1].name}_padded", repeated)
    for reader, after in plans:
        if after is None:
            _pad_parameter(reader, 1, 1, size, namer)
            continue
        last, below = after
        _widen(reader, 0, size, namer)
        reader.attrs["group"] = size
        _pad_parameter(last, 1, 1, size, namer)
        passed.extend(below)
    for tensor in passed:
        tensor.shape = None
    return True


def _reader_plan(graph, reader: gs.Node, tensor: gs.Tensor, count: int):
    """(reader, None) for a plain conv reading ``count`` channels, (reader, (next conv, tensors between))
    for a depthwise conv followed by a plain conv; None when the reader cannot take extra channels."""
    if reader.op != "Conv" or reader.inputs[0] is not tensor or any(t is tensor for t in reader.inputs[1:]):
        return None
    shape = _weight_shape(reader)
    if shape is None or not _parameters_paddable(reader):
        return None
    if _plain_conv(reader):
        return (reader, None) if shape[1] == count else None
    if int(reader.attrs.get("group", 1)) != count or shape[:2] != (count, 1):
        return None
    down = _conv_after(graph, reader, count)
    if down is None or not _paddable(down[0], 1):
        return None
    return reader, down


def _widen(conv: gs.Node, axis: int, size: int, namer: Namer) -> None:
    """Zero output channels (weights and bias) up to ``size``."""
    _pad_parameter(conv, 1, axis, size, namer)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        _pad_parameter(conv, 2, 0, size, namer)


def pad_rgb_inputs(graph) -> int:
    """Give every conv reading dequantized 3-channel codes a fourth, zero channel (module doc)."""
    graph.gs.cleanup(remove_unused_graph_inputs=False)
    namer, count = Namer(graph), 0
    for conv in list(graph.nodes):
        if not _plain_conv(conv) or _weight_shape(conv)[1] != 3 or len(_weight_shape(conv)) != 4 \
                or not _paddable(conv, 1):
            continue
        dequantize = _input_dequantize(graph, conv)
        if dequantize is None:
            continue
        source, codes = conv.inputs[0], dequantize.inputs[0]
        pads = constant(namer, f"{conv.name}.channel_pads", np.array([0, 0, 0, 0, 0, 1, 0, 0], np.int64))
        padded = gs.Variable(namer(f"{codes.name}_padded"), dtype=codes.dtype)
        graph.nodes.append(gs.Node("Pad", namer(f"{conv.name}.channel_pad"), inputs=[codes, pads, dequantize.inputs[2]],
                                   outputs=[padded]))
        dequantize.inputs[0] = padded
        source.shape = None
        _pad_parameter(conv, 1, 1, 4, namer)
        count += 1
    return count


def pad_narrow_outputs(graph, multiple: int) -> int:
    """Widen every plain conv with fewer than ``multiple`` output channels whose output is quantized
    (through per-tensor ops) to ``multiple``, slicing the codes back before the DequantizeLinear."""
    graph.gs.cleanup(remove_unused_graph_inputs=False)
    namer, count = Namer(graph), 0
    for conv in list(graph.nodes):
        if not _plain_conv(conv) or _weight_shape(conv)[0] >= multiple or not _parameters_paddable(conv):
            continue
        passed, codes = _codes_after(graph, conv.outputs[0])
        if codes is None:
            continue
        channels = _weight_shape(conv)[0]
        _widen(conv, 0, multiple, namer)
        readers = list(codes.outputs)
        sliced = gs.Variable(namer(f"{codes.name}_sliced"), dtype=codes.dtype)
        bounds = [constant(namer, f"{conv.name}.slice_{key}", np.array([value], np.int64))
                  for key, value in (("starts", 0), ("ends", channels), ("axes", 1))]
        graph.nodes.append(gs.Node("Slice", namer(f"{conv.name}.slice"), inputs=[codes, *bounds], outputs=[sliced]))
        for reader in readers:
            reader.inputs[0] = sliced
        for tensor in passed:
            tensor.shape = None
        count += 1
    return count


SHIFTS = 4               # onnxruntime's symmetric conv kernels need a multiple of 4 input channels
MIN_SHIFTED_OUTPUTS = 16  # and at least 16 output channels (else it runs im2col + GEMM anyway)
SHIFTED_CHANNELS = (1,)  # 3 (RGB stems): the stem ran 17% faster, the copies cost more than that


def shift_single_channel_inputs(graph) -> int:
    """Rewrite every plain 2-D conv reading dequantized 1-channel codes with 16+ filters (a multiple of
    4) and a kernel at least 2 wide onto 4 column-shifted copies of its codes (module doc)."""
    graph.gs.cleanup(remove_unused_graph_inputs=False)
    namer, count = Namer(graph), 0
    for conv in list(graph.nodes):
        dequantize = _shiftable(graph, conv)
        if dequantize is None:
            continue
        out_channels, channels, kh, kw = _weight_shape(conv)
        taps = -(-kw // SHIFTS)
        pads = [int(p) for p in conv.attrs.get("pads", [0, 0, 0, 0])]
        dh, dw = [int(d) for d in conv.attrs.get("dilations", [1, 1])]
        codes = dequantize.inputs[0]
        widths = np.array([0, 0, 0, pads[1], 0, 0, 0, pads[3] + (SHIFTS * taps - kw) * dw], np.int64)
        padded = gs.Variable(namer(f"{codes.name}_column_padded"), dtype=codes.dtype)
        graph.nodes.append(gs.Node("Pad", namer(f"{conv.name}.column_pad"), outputs=[padded], inputs=[
            codes, constant(namer, f"{conv.name}.column_pads", widths), dequantize.inputs[2]]))
        shifted = [_column_slice(graph, namer, conv.name, padded, j * dw, (SHIFTS - 1 - j) * dw)
                   for j in range(SHIFTS)]
        stacked = gs.Variable(namer(f"{codes.name}_shifted"), dtype=codes.dtype)
        graph.nodes.append(gs.Node("Concat", namer(f"{conv.name}.column_shifts"), attrs={"axis": 1},
                                   inputs=shifted, outputs=[stacked]))
        dequantize.inputs[0] = stacked
        conv.inputs[0].shape = None
        values, weight_dequantize = _parameter(conv.inputs[1])
        row = np.zeros((out_channels, channels, kh, taps * SHIFTS), constant_values(values).dtype)
        row[..., :kw] = constant_values(values)
        # tap b = SHIFTS * t + j of channel c: channel j * channels + c, column t (missing taps stay zero)
        weights = row.reshape(out_channels, channels, kh, taps, SHIFTS).transpose(0, 4, 1, 2, 3).reshape(
            out_channels, SHIFTS * channels, kh, taps)
        new = constant(namer, f"{values.name}_shifted", weights)
        if weight_dequantize is None:
            conv.inputs[1] = new
        else:
            weight_dequantize.inputs[0] = new
        conv.attrs.update(pads=[pads[0], 0, pads[2], 0], dilations=[dh, SHIFTS * dw], kernel_shape=[kh, taps])
        count += 1
    return count


def _shiftable(graph, conv: gs.Node):
    """The per-tensor DequantizeLinear feeding ``conv`` when the rewrite applies, else None."""
    if not _plain_conv(conv) or len(_weight_shape(conv)) != 4:
        return None
    filters, channels, _, width = _weight_shape(conv)
    if (channels not in SHIFTED_CHANNELS or width < 2 or filters < MIN_SHIFTED_OUTPUTS or filters % SHIFTS
            or conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET") or not _paddable(conv, 1)):
        return None
    return _input_dequantize(graph, conv)


def _input_dequantize(graph, conv: gs.Node):
    """The per-tensor DequantizeLinear (with a zero point) whose output only ``conv`` reads, or None."""
    source = conv.inputs[0]
    dequantize = graph.producer(source)
    if (dequantize is None or dequantize.op != "DequantizeLinear" or len(source.outputs) != 1
            or not _per_tensor(dequantize) or not _byte_codes(dequantize)):
        return None
    return dequantize


def _byte_codes(node: gs.Node) -> bool:
    """A QuantizeLinear / DequantizeLinear with an 8-bit zero point (the codes the rewrites serve)."""
    if len(node.inputs) < 3 or not node.inputs[2].name:
        return False
    zero_point = constant_values(node.inputs[2])
    return zero_point is not None and np.asarray(zero_point).dtype in (np.uint8, np.int8)


def _column_slice(graph, namer: Namer, name: str, tensor: gs.Variable, start: int, cut: int) -> gs.Variable:
    """``tensor[..., start : width - cut]``."""
    end = -cut if cut else np.iinfo(np.int64).max
    bounds = [constant(namer, f"{name}.shift_{key}", np.array([value], np.int64))
              for key, value in (("starts", start), ("ends", end), ("axes", 3))]
    out = gs.Variable(namer(f"{tensor.name}_from{start}"), dtype=tensor.dtype)
    graph.nodes.append(gs.Node("Slice", namer(f"{name}.shift"), inputs=[tensor, *bounds], outputs=[out]))
    return out


def _codes_after(graph, tensor: gs.Tensor):
    """(tensors passed, the codes a DequantizeLinear reads) walking from a conv output through
    single-reader per-tensor ops that include a QuantizeLinear; (passed, None) when there are none."""
    passed, quantized = [], False
    while len(tensor.outputs) == 1 and not graph.is_graph_output(tensor):
        node = tensor.outputs[0]
        if node.op not in ELEMENTWISE or node.inputs[0] is not tensor or not _per_tensor(node):
            break
        if node.op == "DequantizeLinear":
            return passed, tensor if quantized and _byte_codes(node) else None
        passed.append(tensor)
        quantized = quantized or node.op == "QuantizeLinear"
        tensor = node.outputs[0]
    return passed, None


def undo_code_padding(graph) -> int:
    """Reverse :func:`pad_rgb_inputs`, :func:`pad_narrow_outputs` and :func:`shift_single_channel_inputs`
    on a QDQ graph (``convert_qat`` reads our own QDQ output): a channel Pad or Slice on the codes between
    a QuantizeLinear and its DequantizeLinear goes, and the conv it served gets its weights back at the
    real width. Widened depthwise blocks and Gathers are left as they are (exact, only wider). Returns
    how many were undone."""
    count = sum(_unshift_input(graph, node) for node in list(graph.nodes) if node.op == "Concat")
    for node in list(graph.nodes):
        source = node.inputs[0] if node.inputs else None
        producer = graph.producer(source) if source is not None else None
        if node.op not in ("Pad", "Slice") or producer is None or producer.op != "QuantizeLinear":
            continue
        readers = list(node.outputs[0].outputs)
        if not readers or any(r.op != "DequantizeLinear" for r in readers) or graph.is_graph_output(node.outputs[0]):
            continue
        fix = _unpad_input(graph, node, readers) if node.op == "Pad" else _unslice_output(graph, node, producer)
        if not fix:
            continue
        for reader in readers:
            reader.inputs[0] = source
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
        count += 1
    return count


def _unshift_input(graph, concat: gs.Node) -> bool:
    """The column shifts of :func:`shift_single_channel_inputs` (Pad -> 4 Slices -> Concat on codes, read
    by DequantizeLinears feeding convs): the convs get their 1-channel kernel and padding back."""
    slices = [graph.producer(t) for t in concat.inputs]
    if (len(slices) != SHIFTS or any(s is None or s.op != "Slice" for s in slices)
            or int(concat.attrs.get("axis", 0)) != 1):
        return False
    pad = graph.producer(slices[0].inputs[0])
    if pad is None or pad.op != "Pad" or any(s.inputs[0] is not pad.outputs[0] for s in slices):
        return False
    readers = list(concat.outputs[0].outputs)
    convs = [c for dq in readers if dq.op == "DequantizeLinear" for c in dq.outputs[0].outputs]
    if (not readers or any(r.op != "DequantizeLinear" for r in readers) or not convs
            or any(not _plain_conv(c) or _weight_shape(c)[1] % SHIFTS for c in convs)):
        return False
    widths = np.asarray(constant_values(pad.inputs[1])).reshape(-1)
    for conv in convs:
        values, dequantize = _parameter(conv.inputs[1])
        weights = np.asarray(constant_values(values))
        out_channels, shifted, kh, taps = weights.shape
        row = weights.reshape(out_channels, SHIFTS, shifted // SHIFTS, kh, taps).transpose(0, 2, 3, 4, 1).reshape(
            out_channels, shifted // SHIFTS, kh, taps * SHIFTS)
        used = np.flatnonzero(np.any(row != 0, axis=(0, 1, 2)))
        kw = int(used[-1]) + 1 if used.size else 1
        dh, dw = [int(d) for d in conv.attrs.get("dilations", [1, SHIFTS])]
        dw //= SHIFTS
        pads = [int(p) for p in conv.attrs.get("pads", [0, 0, 0, 0])]
        conv.attrs.update(pads=[pads[0], int(widths[3]), pads[2], int(widths[7]) - (taps * SHIFTS - kw) * dw],
                          dilations=[dh, dw], kernel_shape=[kh, kw])
        original = gs.Constant(f"{values.name}_unshifted", np.ascontiguousarray(row[..., :kw]))
        if dequantize is None:
            conv.inputs[1] = original
        else:
            dequantize.inputs[0] = original
    for reader in readers:
        reader.inputs[0] = pad.inputs[0]
    for node in [concat, *slices, pad]:
        node.inputs.clear()
        node.outputs.clear()
        graph.nodes.remove(node)
    return True


def _unpad_input(graph, pad: gs.Node, dequantizers: list[gs.Node]) -> bool:
    """A zero-point channel Pad at the end of axis 1 whose convs read it: cut their extra columns."""
    pads = constant_values(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None or np.size(pads) != 8 or np.any(np.delete(np.asarray(pads).reshape(-1), 5)):
        return False
    added = int(np.asarray(pads).reshape(-1)[5])
    convs = [c for dq in dequantizers for c in dq.outputs[0].outputs]
    if not convs or any(not _plain_conv(c) or c.inputs[0] not in [d.outputs[0] for d in dequantizers] for c in convs):
        return False
    for conv in convs:
        _cut_parameter(conv, 1, 1, _weight_shape(conv)[1] - added)
    return True


def _unslice_output(graph, slice_node: gs.Node, quantize: gs.Node) -> bool:
    """A channel Slice [0, n) after a widened conv's QuantizeLinear: cut the conv back to n filters."""
    bounds = [constant_values(t) if t.name else None for t in slice_node.inputs[1:4]]
    if len(bounds) != 3 or any(b is None for b in bounds) or [int(np.asarray(b).reshape(-1)[0]) for b in
                                                              (bounds[0], bounds[2])] != [0, 1]:
        return False
    channels = int(np.asarray(bounds[1]).reshape(-1)[0])
    up = _walk_up(graph, quantize.inputs[0]) if len(quantize.inputs[0].outputs) == 1 else (graph.producer(
        quantize.inputs[0]), [])
    conv = up[0] if up else None
    if not _plain_conv(conv) or _weight_shape(conv)[0] <= channels:
        return False
    _cut_parameter(conv, 1, 0, channels)
    if len(conv.inputs) > 2 and conv.inputs[2].name:
        _cut_parameter(conv, 2, 0, channels)
    return True


def _cut_parameter(conv: gs.Node, index: int, axis: int, size: int) -> None:
    """Keep the first ``size`` entries of a weight / bias along ``axis`` (per-channel factors too)."""
    values, dequantize = _parameter(conv.inputs[index])
    cut = np.take(constant_values(values), np.arange(size), axis=axis)
    replacement = gs.Constant(f"{values.name}_cut", np.ascontiguousarray(cut))
    if dequantize is None:
        conv.inputs[index] = replacement
        return
    dequantize.inputs[0] = replacement
    if int(dequantize.attrs.get("axis", 1)) == axis:
        for slot in (1, 2):
            if len(dequantize.inputs) > slot and dequantize.inputs[slot].name:
                factors = constant_values(dequantize.inputs[slot])
                if np.size(factors) > 1:
                    dequantize.inputs[slot] = gs.Constant(f"{dequantize.inputs[slot].name}_cut",
                                                          np.ascontiguousarray(np.asarray(factors)[:size]))
