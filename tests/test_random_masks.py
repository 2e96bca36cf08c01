"""Random masks drawn once (wtacrs_compile/passes/random_masks.py) and the bit-plane packing
they are saved in (pack_masks.pack_bits)."""

import pytest
import torch
from torch import nn

import wtacrs_compile
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


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(32, 256), nn.Dropout(0.5), nn.Linear(256, 32)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


def _run(backend, steps=3):
    torch.manual_seed(0)
    model = DropoutMLP()
    x = torch.randn(4, 64, 32)
    compiled = torch.compile(model, backend=backend)
    outs, grads = [], []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    return outs, grads, torch.get_rng_state()


@pytest.mark.parametrize("budget", [0.1, None], ids=["default-budget", "no-budget"])
def test_dropout_mask_is_drawn_once_saved_as_bits_and_gradients_are_inductors(budget):
    """Exact (ratio 1): outputs and every gradient are plain Inductor's at every step, the
    global generator ends where Inductor leaves it; the compiled backward draws nothing (no
    seed in, no inductor_random) and takes the mask as 4 x 64 x 256 / 8 bytes."""
    exact_outs, exact_grads, exact_state = _run("inductor")
    packed = wtacrs_compile.backend(ratio=1.0, memory_budget=budget, random_masks="packed")
    outs, grads, state = _run(packed)
    report = packed.reports[0]
    assert len(report.random_masks) == 1
    for ours, theirs in zip(outs, exact_outs):
        torch.testing.assert_close(ours, theirs)
    for ours, theirs in zip(grads, exact_grads):
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b)
    assert torch.equal(state, exact_state)
    assert "inductor_random" not in report.backward_graph
    assert "inductor_lookup_seed" not in report.backward_graph
    assert 4 * 64 * 256 // 8 in report.saved_tensors.values()

    redrawn = wtacrs_compile.backend(ratio=1.0, memory_budget=budget)  # the default
    _run(redrawn, steps=1)
    before = redrawn.reports[0]
    assert before.random_masks == []
    if budget is None:  # Inductor's partition saves the mask as bytes: 7/8 of them go
        assert before.compiled_saved_bytes - report.compiled_saved_bytes == 4 * 64 * 256 * 7 // 8
    else:  # under the budget the seed is saved and backward draws the mask again
        assert "inductor_random" in before.backward_graph


def test_random_masks_option_is_validated():
    with pytest.raises(ValueError, match="random_masks must be one of 'packed', 'redrawn'"):
        wtacrs_compile.WTACRSConfig(random_masks="bits")
