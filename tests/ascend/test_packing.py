"""deq_scale UINT64 packing (SPEC 5.2): bit positions, round trips, validation."""
from __future__ import annotations

import numpy as np
import pytest

from amct_pipeline.ascend import AscendError, pack_deq_scale, unpack_deq_scale


def test_bit_positions_hand_computed():
    # 0.5f = 0x3F000000, 1.0f = 0x3F800000, -2.0f = 0xC0000000
    packed = pack_deq_scale(np.float32([0.5, 1.0, -2.0]), [3, 16, 1], [-1, 5, -128])
    assert packed.dtype == np.uint64
    assert [int(v) for v in packed] == [
        0x3F000000 | (3 << 32) | (0xFF << 40),
        0x3F800000 | (16 << 32) | (5 << 40),
        0xC0000000 | (1 << 32) | (0x80 << 40),
    ]


def test_defaults_are_zero_shift_and_offset():
    deq = np.float32(0.00392156886) * np.float32(0.00106807391)  # scale_d * scale_w in float32
    packed = pack_deq_scale(deq)
    assert packed.shape == (1,)
    assert int(packed[0]) == int(deq.view(np.uint32))  # bits 32..63 all zero


def test_offset_is_at_bit_40_not_32():
    """SPEC 5.2 [D≠C]: AMCT's writer shifts offset_w by 32; the documented layout is 40."""
    word = int(pack_deq_scale(np.float32([1.0]), None, [1])[0])
    assert (word >> 40) & 0xFF == 1 and (word >> 32) & 0xFF == 0


def test_round_trip_random_per_channel():
    rng = np.random.default_rng(0)
    for shift in [None, 0] + list(range(1, 17)):
        c = int(rng.integers(1, 70))
        deq = (rng.uniform(1e-6, 1e-2, c) * rng.choice([1, 1e-3, 1e3], c)).astype(np.float32)
        off = rng.integers(-128, 128, c)
        sh = None if shift is None else np.full(c, shift)
        d, s, o = unpack_deq_scale(pack_deq_scale(deq, sh, off))
        assert d.dtype == np.float32 and s.dtype == np.uint8 and o.dtype == np.int8
        assert np.array_equal(d.view(np.uint32), deq.view(np.uint32))
        assert np.array_equal(s, np.zeros(c) if shift is None else sh)
        assert np.array_equal(o, off)


def test_round_trip_all_offsets_and_per_channel_shifts():
    offs = np.arange(-128, 128)
    shifts = np.arange(256) % 16 + 1
    deq = np.linspace(1e-5, 3.0, 256, dtype=np.float32)
    d, s, o = unpack_deq_scale(pack_deq_scale(deq, shifts, offs))
    assert np.array_equal(d, deq) and np.array_equal(s, shifts) and np.array_equal(o, offs)


def test_scalar_shift_broadcasts():
    d, s, o = unpack_deq_scale(pack_deq_scale(np.float32([1, 2, 3]), 4, 0))
    assert s.tolist() == [4, 4, 4] and o.tolist() == [0, 0, 0]


def test_float64_input_is_packed_as_float32():
    packed = pack_deq_scale(np.array([0.1]))
    assert int(packed[0]) == int(np.float32(0.1).view(np.uint32))


@pytest.mark.parametrize("kwargs, message", [
    (dict(shift_bit=[17]), "outside [0, 16]"),
    (dict(shift_bit=[-1]), "outside [0, 16]"),
    (dict(shift_bit=[1.5]), "integer values"),
    (dict(offset_w=[128]), "outside [-128, 127]"),
    (dict(offset_w=[-129]), "outside [-128, 127]"),
    (dict(shift_bit=[1, 2, 3]), "expected a scalar, [1] or [2]"),
])
def test_validation_errors(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as info:
        pack_deq_scale(np.float32([1.0, 2.0]), **kwargs)
    assert isinstance(info.value, AscendError) and "\n" not in str(info.value)


def test_shift_mix_of_zero_and_nonzero_rejected():
    with pytest.raises(AscendError, match="all 0 or each in"):
        pack_deq_scale(np.float32([1.0, 2.0]), [0, 3])


def test_non_finite_scale_rejected():
    with pytest.raises(AscendError, match="finite"):
        pack_deq_scale(np.float32([1.0, np.inf]))


def test_unpack_rejects_reserved_bits_and_large_shift():
    with pytest.raises(AscendError, match="reserved bits"):
        unpack_deq_scale(np.array([1 << 50], dtype=np.uint64))
    with pytest.raises(AscendError, match="shift N = 17"):
        unpack_deq_scale(np.array([17 << 32], dtype=np.uint64))
    with pytest.raises(AscendError, match="negative"):
        unpack_deq_scale(np.array([-1], dtype=np.int64))
