"""The UINT64 ``deq_scale`` parameter of AscendDequant / AscendRequant (SPEC 5.2), and INT4 weight
packing (SPEC 5.3).

INT4 weights: two codes per byte, the first in the low nibble (SPEC 5.3). The deploy model stores them
as an ONNX ``INT4`` initializer of the weight's own shape, whose bytes are exactly that packing in
row-major order (:func:`pack_int4`, shared with the qdq target); a 1x1 Conv's or a Gemm's pairs are
adjacent input channels as in AMCT, a kxk Conv's adjacent taps. Keeping ONNX's element type keeps the
model checkable and its shapes true; ATC's own re-layout happens on the chip side either way.

Layout of each 64-bit word (one per output channel, or one for the whole tensor)::

    bits  0..31  IEEE-754 float32 bits of scale_d * scale_w[c]
    bits 32..39  shift N (uint8): 0 = no shift, else 1..16 (SPEC 4.6, int16 intermediate)
    bits 40..47  offset_w (int8, two's complement)
    bits 48..63  0

This is the documented layout (the CANN parser and AMCT's own unpacking agree on it). AMCT's
``fuse_dequant_param`` shifts offset_w by 32 instead of 40 (SPEC 5.2 [D≠C]); we do not copy that
bug. It is invisible in AMCT's output only because offset_w is always 0 there.
"""
from __future__ import annotations

import numpy as np

from ..ir.edit import pack_int4
from .errors import AscendError

__all__ = ["pack_deq_scale", "unpack_deq_scale", "pack_int4", "unpack_int4", "SHIFT_BITS", "OFFSET_BITS"]

SHIFT_BITS = 32
OFFSET_BITS = 40
_SCALE_MASK = np.uint64(0xFFFFFFFF)
_BYTE = np.uint64(0xFF)
_RESERVED_MASK = np.uint64(0xFFFF000000000000)


def _integral(name: str, values, shape: tuple[int, ...], lo: int, hi: int) -> np.ndarray:
    """``values`` broadcast to ``shape`` as int64; every value an integer in [lo, hi]."""
    arr = np.asarray(values)
    if arr.dtype == bool or not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
        raise AscendError(f"{name} must be integers, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)) or np.any(arr != np.round(arr)):
            raise AscendError(f"{name} must hold integer values, got {arr.ravel()[:8].tolist()}")
    arr = arr.astype(np.int64)
    if arr.ndim > 1 or (arr.size not in (1, int(np.prod(shape)))):
        raise AscendError(f"{name} has shape {list(arr.shape)}; expected a scalar, [1] or {list(shape)}")
    bad = (arr < lo) | (arr > hi)
    if np.any(bad):
        raise AscendError(f"{name} value {int(arr.ravel()[np.argmax(bad.ravel())])} is outside [{lo}, {hi}]")
    return np.broadcast_to(arr.reshape(-1) if arr.size > 1 else arr.reshape(()), shape).astype(np.int64)


def pack_deq_scale(deq_scale, shift_bit=None, offset_w=None) -> np.ndarray:
    """Pack float32 dequant scales (+ optional shift N and weight offset) into UINT64 words.

    ``deq_scale``: scalar or 1-D (``[1]`` per tensor, ``[C]`` per channel); converted to float32
    (the packed value *is* the float32, so pass the float32 product ``scale_d * scale_w`` you
    mean). ``shift_bit`` / ``offset_w``: None (0), a scalar, ``[1]`` or ``[C]``.

    Validation (SPEC 3, 4.6): scales finite; shifts all 0 or each in [1, 16] (a layer either uses
    the int16 intermediate on every channel or on none); offset_w in [-128, 127].
    Returns a 1-D uint64 array (a scalar input gives shape ``[1]``).
    """
    deq = np.atleast_1d(np.asarray(deq_scale))
    if deq.ndim != 1 or deq.size == 0:
        raise AscendError(f"deq_scale must be a scalar or a non-empty 1-D array, got shape {list(deq.shape)}")
    if not np.issubdtype(deq.dtype, np.floating) and not np.issubdtype(deq.dtype, np.integer):
        raise AscendError(f"deq_scale must be floating point, got dtype {deq.dtype}")
    deq = deq.astype(np.float32)
    if not np.all(np.isfinite(deq)):
        raise AscendError(f"deq_scale must be finite, got {deq[~np.isfinite(deq)][:4].tolist()}")
    shape = deq.shape
    shift = np.zeros(shape, np.int64) if shift_bit is None else _integral("shift_bit", shift_bit, shape, 0, 16)
    if np.any(shift == 0) and np.any(shift != 0):
        raise AscendError(f"shift_bit must be all 0 or each in [1, 16], got a mix: {shift.tolist()[:16]}")
    off = np.zeros(shape, np.int64) if offset_w is None else _integral("offset_w", offset_w, shape, -128, 127)
    words = deq.view(np.uint32).astype(np.uint64)
    words |= shift.astype(np.uint64) << np.uint64(SHIFT_BITS)
    words |= (off & 0xFF).astype(np.uint64) << np.uint64(OFFSET_BITS)
    return words


def unpack_deq_scale(packed) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of :func:`pack_deq_scale`: ``(deq_scale float32, shift_bit uint8, offset_w int8)``.

    Accepts any integer array holding non-negative 64-bit words (ONNX UINT64 initializers load as
    uint64). Reserved bits 48..63 must be 0 and shifts must be 0..16, else AscendError.
    The shape of the input is kept (a scalar gives shape ``[1]``).
    """
    arr = np.atleast_1d(np.asarray(packed))
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise AscendError(f"packed deq_scale must be an unsigned 64-bit integer array, got dtype {arr.dtype}")
    if np.issubdtype(arr.dtype, np.signedinteger) and np.any(arr < 0):
        raise AscendError("packed deq_scale holds negative values; expected uint64 words")
    words = arr.astype(np.uint64)
    if np.any(words & _RESERVED_MASK):
        bad = int(words.ravel()[np.argmax((words & _RESERVED_MASK).ravel() != 0)])
        raise AscendError(f"packed deq_scale word 0x{bad:016x} has reserved bits 48..63 set")
    deq = (words & _SCALE_MASK).astype(np.uint32).view(np.float32)
    shift = ((words >> np.uint64(SHIFT_BITS)) & _BYTE).astype(np.uint8)
    if np.any(shift > 16):
        raise AscendError(f"packed deq_scale has shift N = {int(shift.max())}; must be 0..16")
    offset = ((words >> np.uint64(OFFSET_BITS)) & _BYTE).astype(np.uint8).view(np.int8)
    return deq, shift, offset


def unpack_int4(packed: bytes, shape) -> np.ndarray:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7] of ``shape``."""
    count = int(np.prod(shape, dtype=np.int64))
    data = np.frombuffer(packed, np.uint8)
    if data.size != (count + 1) // 2:
        raise AscendError(f"{data.size} packed bytes cannot hold {count} INT4 codes")
    nibbles = np.stack([data & 0xF, data >> 4], axis=1).reshape(-1)[:count].astype(np.int8)
    return np.where(nibbles > 7, nibbles - 16, nibbles).astype(np.int8).reshape(shape)
