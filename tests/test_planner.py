"""The memory planner: per-op decisions measured on the partitioned graph, compute mode,
packed masks, and composition with the partitioner's activation memory budget."""

import math
import re

import pytest
import torch
import torch.nn as nn

import wtacrs_compile

from stats import assert_unbiased

aten = torch.ops.aten


def mlp_relu():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    return model, (torch.randn(128, 64),)


def bert_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, attn_implementation="eager",
    )
    model = transformers.BertModel(cfg, add_pooling_layer=False)
    return model, (torch.randint(0, 100, (4, 32)),)


def vit_block():
    pytest.importorskip("timm")
    from timm.models.vision_transformer import Block

    torch.manual_seed(0)
    block = Block(dim=64, num_heads=4, mlp_ratio=2.0)
    assert block.attn.fused_attn, "timm's SDPA path"
    return block, (torch.randn(4, 32, 64),)


def t5_block():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(
        vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=1, num_heads=4,
        feed_forward_proj="relu", dropout_rate=0.0,
    )
    return transformers.T5EncoderModel(cfg), (torch.randint(0, 100, (4, 32)),)


def run(model, inputs, **options):
    torch._dynamo.reset()
    backend = wtacrs_compile.backend(**options)
    out = torch.compile(model, backend=backend)(*inputs)
    out = out if isinstance(out, torch.Tensor) else out[0]
    out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    assert len(backend.reports) == 1, "one graph, no break"
    return backend.reports[0]


def mm_nodes(graph_text):
    return set(re.findall(r"%(\w+) : \[num_users=\d+\] = call_function\[target=torch\.ops\.aten\.mm\.default\]", graph_text))


@pytest.mark.parametrize("factory", [mlp_relu, bert_block, vit_block, t5_block], ids=lambda f: f.__name__)
def test_memory_decisions_remove_bytes_and_exact_ops_are_untouched(factory):
    model, inputs = factory()
    memory = run(model, inputs, memory_budget=None, ratio=0.3, mode="memory")
    forced = run(model, inputs, memory_budget=None, ratio=0.3, mode="all")
    assert memory.ops, "the model has weight-gradient matmuls"
    after = mm_nodes(memory.joint_graph_after)
    for op in memory.ops:
        assert op.reason, op
        if op.decision == "memory":
            assert op.measured_saving > 0, op
            assert op.node not in after, f"{op.module} should have been rewritten"
        else:
            assert op.decision == "exact"
            # its node (a matmul, or a fused SDPA backward) is still there, untouched
            assert f"%{op.node} : " in memory.joint_graph_after, f"{op.module} was left exact but changed"
            assert op.op != "linear" or op.node in after
    # The plan never saves more than plain Inductor.  (Forcing every draw into forward may
    # save fewer bytes still, but only where the partitioner then recomputes the draw's inputs
    # in backward: bytes an exact partition under a budget gets without sampling, which memory
    # mode leaves to recomputation -- test_default_plan.py.)
    assert memory.compiled_saved_bytes == memory.wtacrs_saved_bytes
    assert memory.wtacrs_saved_bytes <= memory.baseline_saved_bytes
    assert forced.compiled_saved_bytes == forced.wtacrs_saved_bytes
    if memory.count("memory"):
        assert memory.wtacrs_saved_bytes < memory.baseline_saved_bytes


def test_mlp_plan_and_reasons():
    model, inputs = mlp_relu()
    report = run(model, inputs, memory_budget=None, ratio=0.3, mode="memory", pack_masks=False)
    ops = {op.module: op for op in report.ops}
    # Layer 0 reads the user's input: saving a sample would add bytes, not remove them.
    assert ops["0"].decision == "exact" and "saves no bytes" in ops["0"].reason
    assert ops["2"].decision == "memory"
    k = math.ceil(0.3 * 128)
    full, sample = 128 * 256 * 4, k * (256 * 4 + 12)
    assert ops["2"].saved_bytes_before == full
    # after = before - the saving measured on the partitioned graph: the full activation
    # left; the k-row sample came in, with the draw's probabilities and (CPU) RNG state, and
    # ReLU's bool mask, which its backward no longer recomputes from the full activation.
    mask = 128 * 256
    assert ops["2"].saved_bytes_after == full - ops["2"].measured_saving
    assert sample + mask <= ops["2"].saved_bytes_after <= sample + mask + 8 * 1024
    assert ops["2"].measured_saving == report.baseline_saved_bytes - report.wtacrs_saved_bytes


def weight_grad_flops(gm):
    flops = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.mm.default,):
            a, b = (arg.meta["val"] for arg in node.args[:2])
            flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]  # a drawn product too: (d, k) x (k, d')
        elif node.op == "call_function" and node.target == torch.ops.wtacrs.backward_estimate.default:
            k, out = node.args[2], node.meta["val"]  # the whole estimate as one op: over k rows
            flops += 2 * k * out.shape[0] * out.shape[1]
    return flops


def test_compute_mode_cuts_backward_flops_and_variance():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
    x = torch.randn(512, 64) * torch.linspace(0.1, 3.0, 512)[:, None]
    target = torch.randn(512, 64) * (torch.rand(512, 1) ** 3)  # uneven gradient rows

    def grad_w2(compiled):
        model.zero_grad(set_to_none=True)
        (compiled(x) * target).sum().backward()
        return model[2].weight.grad.clone()

    torch._dynamo.reset()
    exact_c = torch.compile(model, backend=wtacrs_compile.backend(memory_budget=None, ratio=1.0))
    exact = grad_w2(exact_c)

    results = {}
    for mode in ("compute", "all"):
        torch._dynamo.reset()
        backend = wtacrs_compile.backend(memory_budget=None, ratio=0.25, mode=mode)
        compiled = torch.compile(model, backend=backend)
        draws = torch.stack([grad_w2(compiled) for _ in range(300)])
        results[mode] = (backend.reports[0], draws)

    torch._dynamo.reset()
    ref_backend = wtacrs_compile.backend(memory_budget=None, ratio=1.0)
    grad_w2(torch.compile(model, backend=ref_backend))
    full = weight_grad_flops(ref_backend.reports[0].graph_modules["backward"])
    report, draws = results["compute"]
    assert report.count("compute") == 2
    sampled = weight_grad_flops(report.graph_modules["backward"])
    # Input-gradient matmuls are unchanged; the two weight-gradient ones shrink to k/N.
    dx = 2 * 512 * 64 * 256
    dw = 2 * 2 * 512 * 64 * 256
    assert full == dx + dw
    k = math.ceil(0.25 * 512)
    assert sampled == dx + dw * k / 512

    assert_unbiased(draws, exact)
    mse = {m: float(((d - exact) ** 2).sum(dim=(1, 2)).mean()) for m, (_, d) in results.items()}
    # Exact gradient-row norms in the probabilities: lower variance than forward sampling.
    assert mse["compute"] < 0.7 * mse["all"], mse


def relu_dropout():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.2), nn.Linear(256, 64))


def test_packed_masks_are_lossless_and_eight_times_smaller():
    x = torch.randn(128, 64)
    grads = {}
    reports = {}
    for pack in (False, True):
        model = relu_dropout()
        torch._dynamo.reset()
        backend = wtacrs_compile.backend(memory_budget=None, ratio=1.0, pack_masks=pack, rng="philox")
        compiled = torch.compile(model, backend=backend)
        torch.manual_seed(123)  # same dropout draws in both runs
        compiled(x).sum().backward()
        grads[pack] = [p.grad.clone() for p in model.parameters()]
        reports[pack] = backend.reports[0]
    model = relu_dropout()
    torch._dynamo.reset()
    compiled = torch.compile(model)
    torch.manual_seed(123)
    compiled(x).sum().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    for a, b, c in zip(grads[True], grads[False], plain):
        assert torch.equal(a, c) and torch.equal(b, c), "bit-identical to plain torch.compile"
    unpacked, packed = reports[False], reports[True]
    assert sorted(packed.packed_masks) == ["gt", "le"]  # dropout keep-mask, relu mask
    masks = sum(unpacked.saved_tensors[m] for m in packed.packed_masks)
    assert masks == 2 * 128 * 256  # two bool masks, one byte per element
    assert unpacked.wtacrs_saved_bytes - packed.wtacrs_saved_bytes == masks - masks // 8
    assert packed.compiled_saved_bytes == packed.wtacrs_saved_bytes


def test_planner_composes_with_activation_memory_budget():
    model, inputs = bert_block()
    with torch._functorch.config.patch(activation_memory_budget=0.5):
        report = run(model, inputs, memory_budget=None, ratio=0.3, mode="memory")
    for op in report.ops:
        if op.decision == "memory":
            assert op.measured_saving > 0
    assert report.compiled_saved_bytes == report.wtacrs_saved_bytes
    assert report.wtacrs_saved_bytes <= report.baseline_saved_bytes


def test_forced_forward_draws_report_where_the_partitioner_moved_them():
    """mode='all' forces forward sampling; where the partitioner recomputes the draw in
    backward from tensors it saves anyway, the record says so and claims no bytes."""
    model, inputs = vit_block()
    report = run(model, inputs, memory_budget=None, ratio=0.3, mode="all")
    sampled = [op for op in report.ops if op.decision == "memory"]
    assert sampled
    for op in sampled:
        if "runs this draw in backward" in op.reason:
            assert op.saved_bytes_after == op.saved_bytes_before  # no measurement to claim
        elif op.shared_draw_with is None:
            assert op.saved_bytes_after < op.saved_bytes_before
