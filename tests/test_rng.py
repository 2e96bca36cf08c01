"""The draws' own random stream (wtacrs_compile/rng.py): uniform noise, seeding, and that a
compiled wtacrs step leaves torch's global generator exactly where plain Inductor leaves it."""

import pytest
import torch
from torch import nn

import wtacrs_compile
from wtacrs_compile import rng

from stats import assert_uniform_noise


def test_uniform_is_float32_on_the_2_pow_24_grid_and_uniform():
    torch.manual_seed(0)
    u = rng.uniform(torch.zeros(200, 100))
    assert_uniform_noise(u, (200, 100))
    assert rng.uniform(torch.zeros(7, 5, dtype=torch.bfloat16), per_row=True).shape == (7, 1)


def test_draws_never_touch_the_global_generator():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    rng.uniform(torch.zeros(1000))
    assert torch.equal(torch.get_rng_state(), before)


def test_seeding_follows_torch_manual_seed_and_can_be_restarted():
    torch.manual_seed(11)
    a = rng.uniform(torch.zeros(64))
    torch.manual_seed(12)
    b = rng.uniform(torch.zeros(64))
    torch.manual_seed(11)  # a new global seed (12 -> 11): the stream restarts from it
    assert torch.equal(rng.uniform(torch.zeros(64)), a) and not torch.equal(a, b)
    wtacrs_compile.manual_seed(5)
    c = rng.uniform(torch.zeros(64))
    wtacrs_compile.manual_seed(5)
    assert torch.equal(rng.uniform(torch.zeros(64)), c)
    with rng.fork():
        rng.uniform(torch.zeros(64))
    d = rng.uniform(torch.zeros(64))
    wtacrs_compile.manual_seed(5)
    rng.uniform(torch.zeros(64))
    assert torch.equal(rng.uniform(torch.zeros(64)), d), "fork() left the stream as it was"
    with pytest.raises(TypeError, match="manual_seed takes an int"):
        wtacrs_compile.manual_seed(0.5)


class DropoutMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(32, 256), nn.Dropout(0.5), nn.Linear(256, 32)

    def forward(self, x):
        return self.down(self.drop(torch.relu(self.up(x))))


def _run(backend, steps=3):
    """Outputs, final weight gradient and global RNG state after ``steps`` training steps."""
    torch.manual_seed(0)
    model = DropoutMLP()
    x = torch.randn(4, 64, 32)
    compiled = torch.compile(model, backend=backend)
    outs = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        out = compiled(x)
        out.pow(2).sum().backward()
        outs.append(out.detach())
    return outs, model.up.weight.grad.clone(), torch.get_rng_state()


@pytest.mark.parametrize("budget", [None, 0.1], ids=["no-budget", "default-budget"])
def test_a_wtacrs_step_draws_the_same_dropout_masks_as_inductor(budget):
    """Paired runs: the backend's draws come from their own stream, so (with Inductor's Philox
    masks, ``rng="philox"``) the model's dropout masks and everything else drawn from the global
    generator match plain Inductor's at
    every step, and only the weight gradients differ (they are estimates).  Under the
    default memory budget too: recomputation never draws dropout again."""
    exact_outs, exact_grad, exact_state = _run("inductor")
    backend = wtacrs_compile.backend(ratio=0.3, memory_budget=budget, min_draw_gain=0, rng="philox")
    outs, grad, state = _run(backend)
    assert [r.decision for r in backend.reports[0].ops] == ["compute", "compute"]
    for ours, theirs in zip(outs, exact_outs):
        torch.testing.assert_close(ours, theirs)  # same forward, same dropout masks
    assert torch.equal(state, exact_state), "the global generator advanced differently"
    assert not torch.allclose(grad, exact_grad), "the weight gradient is an estimate"
    # and the draws are reproducible from the draws' seed
    wtacrs_compile.manual_seed(1)
    _, again, _ = _run(backend)
    wtacrs_compile.manual_seed(1)
    _, again2, _ = _run(backend)
    assert torch.equal(again, again2)


@pytest.mark.parametrize("budget", [0.5, 0.1])
def test_the_memory_budget_never_redraws_dropout_in_backward(budget):
    """torch's memory-budget partitioner may recompute dropout in backward with fresh noise
    (pytorch/pytorch#190758: another mask than forward's, silently wrong gradients).  Under
    the backend's budget the random ops are banned from recomputation: with nothing sampled
    (ratio 1) and Inductor's masks every gradient is plain Inductor's, at every step (hashed
    masks: tests/test_hash_rng.py)."""
    exact_outs, exact_grad, exact_state = _run("inductor")
    backend = wtacrs_compile.backend(ratio=1.0, memory_budget=budget, min_draw_gain=0, rng="philox")
    outs, grad, state = _run(backend)
    assert backend.reports[0].random_ops_kept == 1  # the dropout's noise
    for ours, theirs in zip(outs, exact_outs):
        torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(grad, exact_grad)
    assert torch.equal(state, exact_state)
