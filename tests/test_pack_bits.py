"""The bit-plane packing of saved boolean masks (wtacrs_compile/passes/pack_masks.py)."""

import pytest
import torch

from wtacrs_compile.passes.pack_masks import pack_bits, unpack_bits


@pytest.mark.parametrize("shape", [(32, 12, 64, 64), (3, 16, 5), (8,), (5, 24), (3, 5), (7,), (2, 3, 5)])
def test_pack_bits_round_trips_in_an_eighth_of_the_bytes(shape):
    torch.manual_seed(0)
    mask = torch.rand(shape) > 0.3
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8
    assert packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_bits(packed, shape), mask)


def test_pack_bits_lays_bits_out_in_planes_along_the_first_axis_divisible_by_8():
    """Bit b of word i is element b * n/8 + i of that axis (a contiguous load and one shift
    per vector when unpacking)."""
    mask = torch.zeros(3, 16, 5, dtype=torch.bool)
    mask[1, 2 * 5 + 1, 4] = True  # plane 5 of the axis of 16 (n/8 = 2), word 1
    packed = pack_bits(mask)
    assert packed.shape == (3, 2, 5)
    assert packed.nonzero().tolist() == [[1, 1, 4]] and int(packed[1, 1, 4]) == 1 << 5
