"""The default plan: exact recomputation under a memory budget first, weight gradients drawn
in backward; memory mode keeps a forward draw only where its sampled rows are what is saved."""

import pytest
import torch

import wtacrs_compile
from wtacrs_compile.graph_utils import PartitionerSettings, input_bytes, partition_saved, saved_value_bytes
from wtacrs_compile.torch_internals import budget_solver_gives_up

from test_planner import bert_block, run, vit_block


def test_defaults_are_compute_mode_under_a_budget():
    cfg = wtacrs_compile.WTACRSConfig()
    assert (cfg.mode, cfg.ratio, cfg.memory_budget) == ("compute", 0.3, 0.1)


def test_masks_stay_unpacked_by_default():
    """Packing a dropout keep-mask fuses into the kernel that draws it and slowed MiniLM's
    step 1.6x (config.py): the default leaves saved masks as torch.bool.  With Inductor's
    Philox (``rng="philox"``) the dropout's mask is saved, one byte per element; with hashed
    draws (``rng="hash"``, and the default ``"auto"`` on the CPU) it is not saved at all:
    backward draws it again from the two keys of its seed (16 bytes)."""
    from test_planner import relu_dropout

    hashed = {"le": 128 * 256}
    for rng, expected in (("auto", hashed), ("hash", hashed), ("philox", {"gt": 128 * 256, "le": 128 * 256})):
        model = relu_dropout()
        report = run(model, (torch.randn(128, 64),), memory_budget=None, ratio=1.0, rng=rng)
        assert report.packed_masks == []
        assert "packed_masks" not in report.measurements
        masks = {name: b for name, b in report.saved_tensors.items() if name in ("gt", "le")}
        assert masks == expected, (rng, report.saved_tensors)
        keys = {name: b for name, b in report.saved_tensors.items() if "seed" in name or "hash_keys" in name}
        assert list(keys.values()) == ([] if rng == "philox" else [16]), (rng, report.saved_tensors)


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, "0.1", True, float("nan")])
def test_bad_memory_budget_names_the_fix(bad):
    with pytest.raises(ValueError, match=r"memory_budget must be a number in \(0, 1\]"):
        wtacrs_compile.WTACRSConfig(memory_budget=bad)


def test_memory_budget_composes_with_the_users_setting():
    assert PartitionerSettings(0.1).budget == 0.1
    assert PartitionerSettings(None).budget == torch._functorch.config.activation_memory_budget
    with torch._functorch.config.patch(activation_memory_budget=0.05):
        assert PartitionerSettings(0.1).budget == 0.05  # the smaller one wins
        assert PartitionerSettings(None).budget == 0.05
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        assert PartitionerSettings(0.1).budget == 0.1
        settings = PartitionerSettings(0.3)
        with settings.active():
            assert torch._functorch.config.activation_memory_budget == 0.3
            settings.relax_bans()
            assert torch._functorch.config.ban_recompute_used_far_apart is False
        # leaving the compile's scope restores the caller's settings
        assert torch._functorch.config.activation_memory_budget == 0.5
        assert torch._functorch.config.ban_recompute_used_far_apart is True


def test_default_plan_on_a_bert_layer():
    model, inputs = bert_block()
    report = run(model, inputs)  # the defaults
    plain = run(model, inputs, memory_budget=None, ratio=1.0, pack_masks=False)  # = Inductor
    # The reference figure is Inductor's own partition of the same graph.
    assert report.inductor_saved_bytes == plain.compiled_saved_bytes
    # Exact recomputation under the budget first, then backward draws on top of it.
    assert report.baseline_saved_bytes < report.inductor_saved_bytes
    assert report.wtacrs_saved_bytes <= report.baseline_saved_bytes
    assert report.compiled_saved_bytes == report.wtacrs_saved_bytes
    assert report.compiled_saved_bytes < 0.5 * report.inductor_saved_bytes
    decisions = {op.decision for op in report.ops}
    assert decisions == {"compute"}, [(op.module, op.decision, op.reason) for op in report.ops]
    recomputed = [op for op in report.ops if op.recomputed]
    assert recomputed, "the budget recomputes activations Inductor saved"
    for op in recomputed:
        assert "recomputed exactly in backward (memory_budget)" in op.reason
    # Nothing is drawn in forward: no sample rows anywhere.
    assert all(op.sample is None for op in report.ops)


def heavy_params_light_activations():
    """Parameters outweigh activations (a large embedding, two rows of tokens): torch's
    budget solver returns its default partition here."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=20000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=256, max_position_embeddings=64, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertModel(cfg, add_pooling_layer=False), (torch.randint(0, 20000, (2, 32)),)


def _budget_gives_up(model, inputs) -> bool:
    """Ask torch's solver itself: under budget 0.1 with the default bans, does it return the
    default partition (same bytes) or recompute (fewer)?"""
    from stage_harness import capture_joint, compiling

    joint = capture_joint(model, *inputs)
    graph = joint.graph()
    jp = joint.joint_pass()
    with compiling(jp, graph):
        default = jp._inductor_partition(graph)
        budgeted = partition_saved(graph, list(joint.static))
    assert budgeted.activation_bytes <= default.activation_bytes
    solver = budgeted.activation_bytes == default.activation_bytes
    assert budget_solver_gives_up(saved_value_bytes(default), input_bytes(graph)) == solver
    return solver


def test_the_solvers_rule_is_told_from_the_default_partition():
    """``budget_solver_gives_up`` (what the pass decides the bans by, without running the
    solver) agrees with the solver on a graph where it gives up and one where it recomputes."""
    torch.manual_seed(0)
    mlp = [torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 64)]
    heavy = torch.nn.Sequential(torch.nn.Embedding(20000, 64), *mlp)  # 5 MB of embedding
    assert _budget_gives_up(heavy, (torch.randint(0, 20000, (2, 32)),))
    # the ReLU output (128 KB) outweighs the inputs' share: the budget recomputes it
    assert not _budget_gives_up(torch.nn.Sequential(*mlp), (torch.randn(128, 64),))


def test_budget_acts_where_torch_returns_the_default_partition():
    model, inputs = heavy_params_light_activations()
    exact = run(model, inputs, ratio=1.0)  # exact gradients, the default budget
    # backward draws only: the bans are lifted by the solver's rule, the compiled graphs tell
    assert "recomputation bans lifted" in exact.partitioner_note
    assert exact.compiled_saved_bytes == exact.baseline_saved_bytes < exact.inductor_saved_bytes
    assert "exact_budget" not in exact.measurements, "no trial partition for backward draws only"
    # with forward draws to plan, the pass measures the same choice itself
    measured = run(model, inputs, ratio=0.3, mode="memory")
    m = measured.measurements
    assert m["exact_budget"] == m["inductor"], "torch's solver gave up: same as the default partition"
    assert m["exact_relaxed_bans"] < m["inductor"]
    assert "recomputation bans lifted" in measured.partitioner_note
    assert m["exact_relaxed_bans"] == exact.compiled_saved_bytes
    # and the gradients are still exact: the partition is only a recomputation choice
    torch._dynamo.reset()
    ref_model, _ = heavy_params_light_activations()
    ref_model.load_state_dict(model.state_dict())
    torch.compile(ref_model)(*inputs)[0].float().sum().backward()
    ours = torch.compile(model, backend=wtacrs_compile.backend(ratio=1.0))
    model.zero_grad(set_to_none=True)
    ours(*inputs)[0].float().sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        if q.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("factory", [bert_block, vit_block], ids=lambda f: f.__name__)
def test_memory_mode_keeps_only_draws_whose_rows_are_saved(factory):
    """A forward draw the partitioner would recompute in backward saves nothing that exact
    recomputation does not: memory mode leaves such an op exact.  Linears reading a
    LayerNorm output (recomputable from the LayerNorm input its backward keeps) get exact
    weight gradients; every op still drawn in forward has its rows in the saved set."""
    model, inputs = factory()
    report = run(model, inputs, ratio=0.3, mode="memory", memory_budget=None)
    after = report.joint_graph_after
    ln_readers = ("query", "key", "value", "intermediate.dense") if factory is bert_block else ("qkv", "fc1")
    for op in report.ops:
        assert "runs this draw in backward" not in op.reason, op
        if op.module.endswith(ln_readers):
            assert op.decision == "exact", (op.module, op.decision, op.reason)
            assert f"%{op.node} : " in after, "left exactly as it was"
        if op.decision == "memory":
            assert op.sample is not None
            saved_roots = _saved_roots(report)
            assert op.sample in saved_roots, (op.module, op.sample, sorted(saved_roots))


def _saved_roots(report):
    from wtacrs_compile.graph_utils import strip_views

    fw = report.graph_modules["forward"]
    bw_inputs = {n.name for n in report.graph_modules["backward"].graph.nodes if n.op == "placeholder"}
    return {strip_views(n).name for n in fw.graph.nodes if n.name in bw_inputs}


def test_the_exact_baseline_is_measured_where_the_draws_change_the_partition():
    """One op per backward draw leaves the partition as the exact one: the report reads the
    baseline off the compiled graphs.  With ``recompute_draw_inputs`` the draw's traced reads
    let the partitioner recompute the GeLU output an exact weight gradient keeps saved: the
    pass measures the exact partition, and the report shows the difference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64))
    inputs = (torch.randn(128, 64),)
    full = 128 * 256 * 4
    as_op = run(model, inputs, memory_budget=None, min_draw_gain=0)
    assert as_op.baseline_saved_bytes == as_op.compiled_saved_bytes == 2 * full
    traced = run(model, inputs, memory_budget=None, min_draw_gain=0, recompute_draw_inputs=True)
    assert traced.baseline_saved_bytes == 2 * full and traced.compiled_saved_bytes == full
