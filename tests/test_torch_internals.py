"""The torch internals the backend depends on, each checked as it is used, on whichever torch
runs the suite (2.14.1 pinned; 2.11 on the GPU machines).  When one of these fails after a
torch upgrade, ``wtacrs_compile/torch_internals.py`` is the one file to adapt."""

import ast
import pathlib

import pytest
import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.checkpoint import CheckpointPolicy

import wtacrs_compile
from wtacrs_compile import torch_internals as ti
from wtacrs_compile.graph_utils import PartitionerSettings, _RELAXED_BANS

from stats import assert_uniform_noise

PACKAGE = pathlib.Path(wtacrs_compile.__file__).parent


def _private_torch_uses(path: pathlib.Path):
    """``torch._x`` imports and attribute chains in one source file (docstrings aside)."""
    tree = ast.parse(path.read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch."):
            parts = node.module.split(".")
            if any(p.startswith("_") for p in parts) or any(a.name.startswith("_") for a in node.names):
                uses.append(node.module)
        elif isinstance(node, ast.Import):
            uses += [a.name for a in node.names if a.name.startswith("torch._")]
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            if isinstance(base, ast.Name) and base.id == "torch":
                uses.append(f"torch.{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in ("_orig_mod", "_dynamo_static_input_type", "recompute"):
            uses.append(repr(node.value))
    return uses


def test_private_torch_apis_only_in_torch_internals():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "torch_internals.py":
            continue
        uses = _private_torch_uses(path)
        if uses:
            offenders[str(path.relative_to(PACKAGE))] = uses
    assert offenders == {}, "move these into wtacrs_compile/torch_internals.py"
    assert _private_torch_uses(PACKAGE / "torch_internals.py"), "the scan finds what it looks for"


def test_compile_hooks_exist_with_the_keywords_used():
    import inspect

    params = inspect.signature(ti.compile_fx).parameters
    assert {"inner_compile", "config_patches"} <= set(params)
    assert callable(ti.compile_fx_inner)
    assert "uuid" in ti.CustomGraphPass.__abstractmethods__
    assert hasattr(torch._inductor.config, "joint_custom_post_pass")
    # passes/meet_budget.py: Inductor calls the custom partitioner with the min-cut's keywords
    assert hasattr(torch._inductor.config, "custom_partitioner_fn")
    assert {"__call__", "uuid"} <= ti.CustomPartitionerFn.__abstractmethods__
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    keywords = set(inspect.signature(min_cut_rematerialization_partition).parameters)
    assert {"compiler", "num_fwd_outputs", "static_lifetime_input_indices"} <= keywords


def test_partitioner_config_keys():
    for key in ("activation_memory_budget", "enable_autograd_cache"):
        assert hasattr(ti.functorch_config, key), key
    present = [k for k in _RELAXED_BANS if hasattr(ti.functorch_config, k)]
    assert present, "none of the recomputation bans PartitionerSettings relaxes exists"
    settings = PartitionerSettings(0.2)
    with settings.active():
        assert ti.functorch_config.activation_memory_budget == 0.2
        assert ti.functorch_config.enable_autograd_cache is False


def test_decompositions_keep_rand_like_whole_where_inductor_lowers_it():
    table = ti.decompositions()
    assert torch.ops.aten.addmm.default in table or torch.ops.aten.native_layer_norm.default in table
    kept_whole = not any(getattr(op, "overloadpacket", None) is torch.ops.aten.rand_like for op in table)
    assert kept_whole == ti.inductor_lowers_rand_like()
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 12):
        assert ti.inductor_lowers_rand_like()


@pytest.mark.parametrize("lowered", [True, False], ids=["rand_like", "randint"])
def test_uniform_noise_either_way(monkeypatch, lowered):
    # torch 2.11's Inductor does not lower rand_like (the draws use randint there): both
    # sources give float32 on [0, 1) in steps of 2**-24, uniform
    monkeypatch.setattr(ti, "inductor_lowers_rand_like", lambda: lowered)
    torch.manual_seed(0)
    u = ti.replayable_uniform(torch.zeros(200, 100, dtype=torch.bfloat16))
    assert_uniform_noise(u, (200, 100))
    assert ti.replayable_uniform(torch.zeros(7, 5), per_row=True).shape == (7, 1)


def test_make_fx_graph_traces_aten_ops_on_fake_tensors():
    mode = FakeTensorMode()
    with mode:
        x = torch.empty(4, 3)
    gm = ti.make_fx_graph(lambda t: (t * t).sum(-1).sqrt(), [x], mode)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.mul.Tensor in targets and torch.ops.aten.sqrt.default in targets
    assert ti.detect_fake_mode([n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"]) is mode


def test_size_hint_of_a_symbolic_size():
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    env = ShapeEnv()
    sym = env.create_symintnode(env.create_symbol(7, ConstantSource("n")), hint=7)
    assert ti.size_hint(sym * 3) == 21
    assert not env.guards, "reading the hint adds no guard"


def test_replay_tag_is_the_checkpoint_policy():
    g = torch.fx.Graph()
    node = g.placeholder("x")
    ti.replay_in_backward(node)
    assert node.meta["recompute"] is CheckpointPolicy.MUST_RECOMPUTE


def test_dynamo_conventions():
    m = nn.Linear(2, 2)
    assert ti.original_module(torch.compile(m)) is m
    assert ti.original_module(m) is m
    assert ti.is_static_input(m.weight) and not ti.is_static_input(torch.zeros(2))
    before = torch._inductor.config.fx_graph_cache
    with ti.fresh_compiles():
        assert torch._inductor.config.fx_graph_cache is False
        assert ti.functorch_config.enable_autograd_cache is False
    assert torch._inductor.config.fx_graph_cache == before


@pytest.mark.parametrize("name", ["_scaled_dot_product_flash_attention_for_cpu_backward",
                                  "_scaled_dot_product_efficient_attention_backward"])
def test_fused_attention_names_are_real_ops(name):
    assert name in ti.FUSED_ATTENTION_BACKWARD
    assert hasattr(torch.ops.aten, name)


def test_dtype_rules_are_torchs_built_once_and_rebuilt_when_the_registry_grows(monkeypatch):
    from torch._inductor import utils as inductor_utils
    from torch._inductor.dtype_propagation import DtypePropagationOpsHandler as Handler
    from torch._inductor.ops_handler import OP_NAMES

    torchs_init = Handler.__init__
    builds = []
    monkeypatch.setattr(Handler, "__init__", lambda self: (builds.append(1), torchs_init(self))[1])
    patched_by_test = Handler.__init__
    Handler()
    assert len(builds) == 1  # torch's rebuild on every construction, as patched above
    expected = {op: getattr(Handler(), op) for op in OP_NAMES}
    # an earlier compile in this process may have left the singleton marked as built
    monkeypatch.delattr(Handler(), "_wtacrs_rules_key", raising=False)
    builds.clear()
    with ti.dtype_rules_built_once():
        with ti.dtype_rules_built_once():  # nested compiles share one patch
            handlers = [Handler() for _ in range(5)]
        assert len(builds) == 1, "the rules are built once while the registry is unchanged"
        assert all(h is handlers[0] for h in handlers)
        for op in OP_NAMES:  # torch's own rules, bound to the same functions
            got, want = getattr(handlers[0], op), expected[op]
            assert getattr(got, "func", got) == getattr(want, "func", want), op
            assert getattr(got, "keywords", None) == getattr(want, "keywords", None), op
        # a late registration (the one registry that grows) is picked up on the next construction
        monkeypatch.setitem(inductor_utils.op_dtype_propagation_rules, "wtacrs_test_op",
                            inductor_utils.OpDtypeRule(torch._prims_common.ELEMENTWISE_TYPE_PROMOTION_KIND.DEFAULT, torch.int8))
        assert hasattr(Handler(), "wtacrs_test_op") and len(builds) == 2
    assert Handler.__init__ is patched_by_test, "torch's __init__ is restored on exit"
