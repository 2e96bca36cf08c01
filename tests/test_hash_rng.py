"""The hashed uniform draws (wtacrs_compile/passes/hash_rng.py): their statistics, and that
a compiled step applies forward's dropout mask in backward, recomputed from its seed."""

import math

import pytest
import torch
from torch import nn

import wtacrs_compile
from wtacrs_compile.passes.hash_rng import hash_uniform

from stats import assert_uniform_noise

N = 1 << 20
SD_MEAN = math.sqrt(1 / 12 / N)  # standard error of the mean of N uniforms


def _seed(s: int) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.int64)


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return float((a * b).sum() / (a.norm() * b.norm()))


def test_hash_uniform_is_float32_on_the_2_pow_24_grid_and_uniform():
    assert_uniform_noise(hash_uniform((200, 100), _seed(7)), (200, 100))
    u = hash_uniform((N,), _seed(123456789123))
    assert abs(float(u.mean()) - 0.5) < 5 * SD_MEAN
    # each of the 24 bits the value carries is set half the time (5 sd of a binomial)
    bits = (u * 2**24).to(torch.int64)
    for b in range(24):
        assert abs(float(((bits >> b) & 1).double().mean()) - 0.5) < 5 * 0.5 / math.sqrt(N), b
    assert hash_uniform((4, 3), _seed(1), torch.bfloat16).dtype == torch.bfloat16


def test_a_dropout_mask_keeps_the_expected_fraction():
    for p in (0.1, 0.5):
        keep = (hash_uniform((N,), _seed(99)) > p).double().mean()
        assert abs(float(keep) - (1 - p)) < 5 * math.sqrt(p * (1 - p) / N)


def test_neighbours_and_seeds_are_uncorrelated():
    """No correlation between neighbouring elements, 2-D neighbours, seeds one apart, nor
    between one seed's draws and another's shifted or permuted by the seeds' difference (what
    adding or xor-ing the seed into the index would give): |r| under 5 / sqrt(N)."""
    bound = 5 / math.sqrt(N)
    u = hash_uniform((N,), _seed(5))
    assert abs(_corr(u[1:], u[:-1])) < bound
    assert abs(_corr(u[1024:], u[:-1024])) < bound
    for other in (6, 5 + (1 << 32), 5 + 4096):
        v = hash_uniform((N,), _seed(other))
        assert abs(_corr(u, v)) < bound, other
    v = hash_uniform((N,), _seed(5 + 4096))
    assert abs(_corr(u[4096:], v[:-4096])) < bound
    # nor a permutation of one another (5 ^ 4101 = 4096: a key xor-ed into the index alone)
    perm = torch.arange(N) ^ 4096
    assert abs(_corr(u, v[perm])) < bound
    assert not torch.equal(u.sort().values, v.sort().values)
    # pairs of neighbours fill a 16 x 16 grid evenly (chi-square, 255 dof: mean 255, sd 22.6)
    cells = (u[0::2] * 16).long() * 16 + (u[1::2] * 16).long()
    counts = torch.bincount(cells, minlength=256).double()
    expected = (N // 2) / 256
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 255 + 5 * 22.6


def test_flipping_one_bit_of_the_index_flips_each_output_bit_half_the_time():
    """Avalanche: for each of the index's low 20 bits, the 24 bits a draw carries differ
    between element i and element i ^ 2**b with probability 0.5 (5 sd of a binomial)."""
    u = hash_uniform((N,), _seed(2024))
    bits = (u * 2**24).to(torch.int64)
    idx = torch.arange(N)
    for b in range(20):
        flipped = bits ^ bits[idx ^ (1 << b)]
        for out in range(24):
            rate = float(((flipped >> out) & 1).double().mean())
            assert abs(rate - 0.5) < 5 * 0.5 / math.sqrt(N), (b, out, rate)


def test_the_same_seed_gives_the_same_draws():
    assert torch.equal(hash_uniform((3, 5), _seed(42)), hash_uniform((3, 5), _seed(42)))
    assert not torch.equal(hash_uniform((3, 5), _seed(42)), hash_uniform((3, 5), _seed(43)))


class DropoutMLP(nn.Module):
    def __init__(self, p=0.5):
        super().__init__()
        self.up, self.drop, self.down = nn.Linear(32, 256), nn.Dropout(p), nn.Linear(256, 32)

    def forward(self, x):
        h = self.drop(self.up(x))
        return self.down(h), h


@pytest.mark.parametrize("budget", [1.0, 0.1])
def test_backward_applies_the_mask_forward_drew(budget):
    """Exact gradients (ratio 1) of a compiled step with hashed dropout equal eager autograd's
    through the mask the forward applied (read off its output: ``up(x)`` has no zeros), and
    backward draws the mask again from its seed instead of reading it from memory."""
    torch.manual_seed(0)
    model = DropoutMLP()
    x = torch.randn(4, 64, 32)
    backend = wtacrs_compile.backend(ratio=1.0, memory_budget=budget, rng="hash")
    out, h = torch.compile(model, backend=backend)(x)
    out.pow(2).sum().backward()
    report = backend.reports[0]
    assert report.uniform_draws == {"hashed": 1, "elements": 4 * 64 * 256}
    assert "inductor_random" not in report.forward_graph + report.backward_graph
    assert "iota" in report.backward_graph, "backward recomputes the mask from its seed"
    # the seed's keys are one op (saved for backward, or drawn again there under a budget),
    # not scalar arithmetic that Inductor would inline into each kernel reading the draw
    keys_op = "target=torch.ops.wtacrs.hash_keys.default]"
    assert report.forward_graph.count(keys_op) == 1
    assert report.backward_graph.count(keys_op) <= 1
    assert "bitwise_and" not in report.forward_graph.split(keys_op)[0], "the seed's keys come from the op"
    grads = [p.grad.clone() for p in model.parameters()]

    mask = h.detach() != 0
    assert 0.4 < float(mask.double().mean()) < 0.6
    model.zero_grad()
    ref_h = model.up(x) * mask * 2.0
    model.down(ref_h).pow(2).sum().backward()
    torch.testing.assert_close(h, ref_h)
    for got, want in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)


def test_draws_are_reproducible_under_manual_seed_and_leave_the_generator_as_inductor_does():
    def run(backend):
        torch.manual_seed(3)
        model = DropoutMLP()
        x = torch.randn(2, 16, 32)
        compiled = torch.compile(model, backend=backend)
        hs = [compiled(x)[1].detach() for _ in range(2)]
        return hs, torch.get_rng_state()

    a, state_a = run(wtacrs_compile.backend(ratio=1.0, rng="hash"))
    b, state_b = run(wtacrs_compile.backend(ratio=1.0, rng="hash"))
    _, state_inductor = run("inductor")
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not torch.equal(a[0] != 0, a[1] != 0), "each step draws a new mask"
    assert torch.equal(state_a, state_inductor), "the seeds come from torch's generator, as Inductor's do"


def test_philox_keeps_inductors_draws_and_normal_draws_are_left_alone():
    class Noisy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(16, 16)

        def forward(self, x):
            return nn.functional.dropout(self.lin(x), 0.2) + 0.01 * torch.randn_like(x)

    x = torch.randn(8, 16)
    hashed = {"hashed": 1, "elements": 128, "randn draws (only uniform ones are hashed)": 1}
    for rng, expected in (("hash", hashed), ("auto", hashed), ("philox", {})):
        backend = wtacrs_compile.backend(rng=rng, ratio=1.0)
        torch.compile(Noisy(), backend=backend)(x).sum().backward()
        assert backend.reports[0].uniform_draws == expected, rng


def test_auto_hashes_the_cpu_draws_and_leaves_other_devices_to_philox():
    """``rng="auto"`` (the default) rewrites only the draws made on the CPU; a draw on another
    device (here ``meta``, standing for a GPU this machine lacks) keeps Inductor's Philox and
    is counted with the reason, which the inspector prints.  ``"hash"`` rewrites both."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from wtacrs_compile.passes.hash_rng import hash_uniform_draws

    def draws(seed_cpu, seed_other):
        rand = torch.ops.prims.inductor_random.default
        return rand([4, 8], seed_cpu, "rand"), rand([4, 8], seed_other, "rand")

    seeds = (_seed(1), torch.tensor(1, dtype=torch.int64, device="meta"))
    reason = "meta draws (rng='auto' hashes CPU draws; rng='hash' hashes all)"
    for cpu_only, expected in ((True, {"hashed": 1, "elements": 32, reason: 1}), (False, {"hashed": 2, "elements": 64})):
        gm = make_fx(draws, tracing_mode="fake")(*seeds)
        assert hash_uniform_draws(gm.graph, cpu_only=cpu_only) == expected
        left = [n for n in gm.graph.nodes if n.target is torch.ops.prims.inductor_random.default]
        assert [n.meta["val"].device.type for n in left] == (["meta"] if cpu_only else [])
    assert wtacrs_compile.WTACRSConfig().rng == "auto"


def test_an_unknown_rng_is_an_error_naming_the_choices():
    with pytest.raises(ValueError, match="rng must be one of 'auto', 'hash', 'philox', got 'mt19937'"):
        wtacrs_compile.WTACRSConfig(rng="mt19937")
