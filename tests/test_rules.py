"""Per-op settings: config rules, in-code annotations, defaults, errors and recompilation.

The plan (which op is sampled, with which k) is decided in the joint-graph pass, before
Inductor generates code.  Most tests here only read that plan, so they stub Inductor's code
generation (``plan_only``: the partitioned graphs run eagerly), which takes a BERT compile
from about a minute to a few seconds on two cores.  The recompilation test runs Inductor.
"""

import copy
import dataclasses
import json
import math
import sys
import warnings

import pytest
import torch
import torch.nn as nn
from torch._functorch.aot_autograd import make_boxed_func

import wtacrs_compile
from wtacrs_compile import Rule, WTACRSConfig, WTACRSRuleWarning
from wtacrs_compile.config import reset_rule_warnings

transformers = pytest.importorskip("transformers")

BATCH, SEQ = 2, 16
N = BATCH * SEQ  # rows of every encoder linear's input


@pytest.fixture(autouse=True)
def _fresh_rule_warnings():
    reset_rule_warnings()
    yield
    reset_rule_warnings()


@pytest.fixture
def plan_only(monkeypatch):
    """Run the compiled graphs eagerly instead of generating Inductor code."""
    monkeypatch.setattr(
        sys.modules["wtacrs_compile.compiled_graphs"], "compile_fx_inner", lambda gm, inputs, **kw: make_boxed_func(gm.forward)
    )


def tiny_bert(layers=2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=32, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(cfg)


def bert_inputs():
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 100, (BATCH, SEQ), generator=gen), torch.tensor([0, 1])


def run(model, backend, **compile_kw):
    """One training step of ``model`` compiled with ``backend``; returns the loss."""
    ids, labels = bert_inputs()
    loss = torch.compile(model, backend=backend, **compile_kw)(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss


def plan_of(model, **options):
    """The plan ``mode="all"`` (every enabled op sampled in forward) makes for ``model``'s
    linear layers (attention bmms are left out unless ``ops`` says otherwise)."""
    options.setdefault("ops", ("linear",))
    # rules decide sampling; the last layer's exact live-rows rewrite (tests/test_live_rows.py)
    # would give its [CLS]-only ops k = batch whatever the rules say
    options.setdefault("live_rows", False)
    backend = wtacrs_compile.backend(memory_budget=None, mode="all", **options)
    run(model, backend, fullgraph=True)
    assert len(backend.reports) == 1
    return backend.reports[0]


def linears(model):
    return {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def summary(report):
    return sorted((op.module, op.decision, op.k, op.ratio) for op in report.ops)


# ------------------------------------------------------------------------------------------
# The rule engine, without compiling


def resolve(config, fqn, types=(nn.Linear,), op="linear", annotation=None):
    return config.resolve(fqn, types, op, annotation)


def test_match_globs_match_any_dotted_suffix_and_enclosing_modules():
    cfg = WTACRSConfig(ratio=0.1, keep_heads_exact=False, rules=(
        Rule(match="encoder.layer.[0-5].*", ratio=0.5),
        Rule(match="classifier", ratio=0.2),
        Rule(match="bert.encoder.layer.7", ratio=0.7),  # a module: the ops inside it
    ))
    ratio = lambda fqn: resolve(cfg, fqn).ratio  # noqa: E731
    assert ratio("bert.encoder.layer.0.attention.self.query") == 0.5  # suffix of the FQN
    assert ratio("encoder.layer.5.output.dense") == 0.5  # the whole FQN
    assert ratio("bert.encoder.layer.6.output.dense") == 0.1
    assert ratio("bert.encoder.layer.10.output.dense") == 0.1  # [0-5] is one character
    assert ratio("bert.encoder.layer.1") == 0.1  # `.*` needs something below the layer
    assert ratio("classifier") == 0.2 and ratio("model.classifier") == 0.2
    assert ratio("classifier.out_proj") == 0.2  # RoBERTa: inside the classifier module
    assert ratio("pre_classifier") == 0.1  # a suffix starts at a dot
    assert ratio("bert.encoder.layer.7.attention.self.key") == 0.7
    assert ratio("bert.encoder.layer.70.attention.self.key") == 0.1


def test_regex_rules_fullmatch_the_whole_fqn():
    cfg = WTACRSConfig(ratio=0.1, rules=(
        Rule(match=r"re:encoder\.layer\.\d+\.output\.dense", ratio=0.3),  # no suffix relaxation
        Rule(match=r"re:(.*\.)?layer\.(0|1)\.attention\..*", ratio=0.5),
    ))
    assert resolve(cfg, "encoder.layer.3.output.dense").ratio == 0.3
    assert resolve(cfg, "bert.encoder.layer.3.output.dense").ratio == 0.1
    assert resolve(cfg, "encoder.layer.3.output.dense_x").ratio == 0.1  # fullmatch, not search
    assert resolve(cfg, "bert.encoder.layer.1.attention.self.query").ratio == 0.5
    assert resolve(cfg, "bert.encoder.layer.11.attention.self.query").ratio == 0.1


def test_rules_apply_in_order_last_match_wins_field_by_field():
    cfg = WTACRSConfig(ratio=0.3, rules=(
        Rule(ratio=0.5, min_k=4, mode="compute"),  # no selector: every op
        Rule(match="*.query", ratio=0.2),
        Rule(match="layer.0.*", enabled=False),
        Rule(match="layer.0.attention.*", enabled=True, deterministic=0.0, sampling="iid"),
    ))
    q0 = resolve(cfg, "bert.encoder.layer.0.attention.self.query")
    assert (q0.enabled, q0.ratio, q0.min_k, q0.mode, q0.deterministic) == (True, 0.2, 4, "compute", 0.0)
    assert q0.sampling == "iid" and resolve(cfg, "bert.encoder.layer.1.output.dense").sampling == "systematic"
    assert q0.rules == (0, 1, 2, 3)
    out0 = resolve(cfg, "bert.encoder.layer.0.output.dense")
    assert not out0.enabled and out0.rules == (0, 2)
    assert out0.reason == "disabled by rule 2: Rule(match='layer.0.*', enabled=False)"
    q1 = resolve(cfg, "bert.encoder.layer.1.attention.self.query")
    assert (q1.enabled, q1.ratio, q1.min_k, q1.rules) == (True, 0.2, 4, (0, 1))


def test_module_type_by_class_or_name_including_subclasses_and_enclosing_modules():
    class MyLinear(nn.Linear):
        pass

    class BertLayer(nn.Module):  # stands for an enclosing module of the op
        pass

    def selects(selector, types):
        cfg = WTACRSConfig(rules=(Rule(module_type=selector, ratio=0.5),))
        return resolve(cfg, "x.y", types).ratio == 0.5

    for selector in (nn.Linear, "Linear", "nn.Linear", "torch.nn.Linear", "torch.nn.modules.linear.Linear"):
        assert selects(selector, (nn.Linear,)) and selects(selector, (MyLinear,)), selector
    assert selects("MyLinear", (MyLinear,)) and not selects("MyLinear", (nn.Linear,))
    assert selects("BertLayer", (nn.Linear, BertLayer)) and selects(BertLayer, (nn.Linear, BertLayer))
    assert not selects("Conv2d", (nn.Linear, BertLayer)) and not selects(nn.Conv2d, (nn.Linear,))
    assert not selects("linear", (nn.Linear,))  # names are case-sensitive


def test_op_linear_also_selects_lora_adapters_and_config_ops_is_a_hard_filter():
    cfg = WTACRSConfig(ops=("linear",), rules=(
        Rule(op="linear", ratio=0.5),
        Rule(op="lora", ratio=0.25),
        Rule(op="bmm", enabled=True),
    ))
    assert resolve(cfg, "q_proj", op="linear").ratio == 0.5
    lora = resolve(cfg, "q_proj.lora_A.default", op="lora")
    assert lora.ratio == 0.25 and lora.rules == (0, 1)
    bmm = resolve(cfg, "attention.self", op="bmm")  # bmm is not in config.ops: no rule adds it
    assert not bmm.enabled and "not in config.ops" in bmm.reason and bmm.rules == (2,)


def test_heads_and_embeddings_are_exact_by_default_unless_a_rule_enables_them():
    cfg = WTACRSConfig()
    for fqn in ("classifier", "classifier.out_proj", "lm_head", "cls.predictions.decoder", "head.fc",
                "qa_outputs", "score", "pre_classifier", "bert.pooler.dense"):
        s = resolve(cfg, fqn)
        assert not s.enabled and "output head" in s.reason, fqn
    for fqn in ("bert.embeddings.projection", "embeddings_project", "model.embed_tokens.proj"):
        s = resolve(cfg, fqn)
        assert not s.enabled and "embedding" in s.reason, fqn
    for fqn in ("bert.encoder.layer.0.attention.self.query", "heads_mixer"):
        assert resolve(cfg, fqn).enabled, fqn
    # A rule that only sets a ratio does not enable a head; enabled=True does.
    assert not resolve(cfg.replace(rules=({"match": "classifier", "ratio": 0.5},)), "classifier").enabled
    assert resolve(cfg.replace(rules=({"match": "classifier", "enabled": True},)), "classifier").enabled
    assert resolve(cfg.replace(keep_heads_exact=False), "classifier").enabled


def test_annotations_apply_after_rules():
    cfg = WTACRSConfig(ratio=0.3, rules=(Rule(match="layer.0", ratio=0.2, min_k=3),))
    s = resolve(cfg, "bert.encoder.layer.0.output.dense", annotation={"ratio": 0.5})
    assert (s.ratio, s.min_k, s.rules, dict(s.annotation)) == (0.5, 3, (0,), {"ratio": 0.5})
    s = resolve(cfg, "bert.encoder.layer.0.output.dense", annotation={"enabled": False})
    assert not s.enabled and s.reason == "disabled by annotation annotate(enabled=False)"
    s = resolve(cfg, "classifier", annotation={"enabled": True})
    assert s.enabled  # an annotation may enable a head too
    cfg_off = cfg.replace(rules=({"match": "classifier", "enabled": False},))
    assert resolve(cfg_off, "classifier", annotation={"enabled": True}).enabled


def test_plain_data_options_equal_python_rules():
    options = {
        "ratio": 0.3,
        "rules": [
            {"match": "classifier", "enabled": False},
            {"match": "encoder.layer.[0-5].*", "ratio": 0.5},
            {"module_type": "nn.Linear", "op": "linear", "min_k": 2, "mode": "compute"},
        ],
    }
    from_data = WTACRSConfig.from_options(json.loads(json.dumps(options)))  # survives JSON/YAML
    in_python = WTACRSConfig(ratio=0.3, rules=(
        Rule(match="classifier", enabled=False),
        Rule(match="encoder.layer.[0-5].*", ratio=0.5),
        Rule(module_type="nn.Linear", op="linear", min_k=2, mode="compute"),
    ))
    assert from_data == in_python and from_data.fingerprint() == in_python.fingerprint()
    assert WTACRSConfig.from_options(from_data.to_dict()) == from_data  # round trip


@pytest.mark.parametrize(
    "options, message",
    [
        ({"rules": [{"match": "x", "ratio": 0}]}, r"rules\[0\]: rule .*ratio must be in \(0, 1\]"),
        ({"rules": [{"match": "x"}, {"match": "y", "ratio": 1.5}]}, r"rules\[0\]: .*sets nothing"),
        ({"rules": [{"match": "x", "ratio": 0.5}, {"match": "y", "ratio": 1.5}]}, r"rules\[1\]: .*\(0, 1\]"),
        ({"rules": [{"match": "x", "min_k": 0}]}, r"min_k must be an integer >= 1"),
        ({"rules": [{"match": "x", "mode": "memroy"}]}, r"mode must be one of 'memory', .*did you mean 'memory'"),
        ({"rules": [{"match": "x", "deterministic": 1.0}]}, r"deterministic fraction must be in \[0, 1\)"),
        ({"sampling": "stratified"}, r"sampling must be 'systematic' .* or 'iid'"),
        ({"min_draw_gain": -1}, r"min_draw_gain must be a number >= 0"),
        ({"rules": [{"match": "x", "sampling": "IID"}]}, r"rules\[0\].*sampling must be .*got 'IID' \(did you mean 'iid'\?\)"),
        ({"rules": [{"match": "x", "enabled": "no"}]}, r"enabled must be true or false"),
        ({"rules": [{"op": "Linear", "ratio": 0.5}]}, r"op must be one of 'linear', 'bmm', 'lora'.*did you mean 'linear'"),
        ({"rules": [{"match": "x", "ratios": 0.5}]}, r"unknown rule key 'ratios' \(did you mean 'ratio'\?\); valid keys: match"),
        ({"rules": [{"match": "re:layer.(", "ratio": 0.5}]}, r"invalid regex"),
        ({"rules": [{"match": "", "ratio": 0.5}]}, r"match must be a non-empty FQN glob"),
        ({"rules": [{"module_type": 3, "ratio": 0.5}]}, r"module_type must be a class or a class name"),
        ({"rules": {"match": "x", "ratio": 0.5}}, r"rules must be a list"),
        ({"rule": []}, r"unknown option 'rule' \(did you mean 'rules'\?\)"),
    ],
)
def test_invalid_values_raise_naming_the_valid_range(options, message):
    with pytest.raises(ValueError, match=message):
        WTACRSConfig.from_options(options)


def test_invalid_annotations_raise_naming_the_valid_range():
    with pytest.raises(ValueError, match=r"annotate: ratio must be in \(0, 1\]"):
        wtacrs_compile.annotate(ratio=2.0)
    with pytest.raises(ValueError, match=r"annotate: sets nothing"):
        wtacrs_compile.annotate()
    with pytest.raises(TypeError):
        wtacrs_compile.annotate(ratios=0.5)
    with pytest.raises(ValueError, match=r"annotate_module\(Linear\): mode must be one of"):
        wtacrs_compile.annotate_module(nn.Linear(2, 2), mode="fast")
    with pytest.raises(ValueError, match=r"annotation: min_k must be an integer >= 1"):
        WTACRSConfig().resolve("x", (), "linear", {"min_k": 0})


# ------------------------------------------------------------------------------------------
# HF BERT from a config, compiled


def test_bert_excluding_classifier_and_attention_output_leaves_exactly_those_exact(plan_only):
    model = tiny_bert(layers=2)
    report = plan_of(model, ratio=0.3, rules=[
        {"match": "classifier", "enabled": False},
        {"match": "*.attention.output.*", "enabled": False},
    ])
    assert {op.module for op in report.ops} == linears(model)
    exact = {op.module for op in report.ops if op.decision == "exact"}
    assert exact == {"classifier", "bert.pooler.dense", "bert.encoder.layer.0.attention.output.dense",
                     "bert.encoder.layer.1.attention.output.dense"}
    by_module = {op.module: op for op in report.ops}
    assert by_module["classifier"].rules == [0] and "disabled by rule 0" in by_module["classifier"].reason
    dense = by_module["bert.encoder.layer.1.attention.output.dense"]
    assert dense.rules == [1] and dense.reason == "disabled by rule 1: Rule(match='*.attention.output.*', enabled=False)"
    for op in report.ops:
        if op.module not in exact:
            assert op.decision == "memory" and op.rules == [] and op.k == math.ceil(0.3 * op.shapes["x"][0])


def test_bert_first_six_layers_at_half_the_rest_at_a_tenth(plan_only):
    model = tiny_bert(layers=8)
    report = plan_of(model, ratio=0.1, rules=[{"match": "encoder.layer.[0-5].*", "ratio": 0.5}])
    assert {op.module for op in report.ops} == linears(model)
    for op in report.ops:
        if op.module in ("classifier", "bert.pooler.dense"):  # heads: exact by default
            assert op.decision == "exact"
            continue
        n = op.shapes["x"][0]
        layer = op.module.split(".")[3] if op.module.startswith("bert.encoder.layer.") else None
        if layer is not None and int(layer) <= 5:
            assert (op.ratio, op.k, op.rules) == (0.5, N // 2, [0]), op
        else:  # layers 6, 7
            assert (op.ratio, op.k, op.rules) == (0.1, math.ceil(0.1 * n), []), op
        assert op.decision == "memory"
    assert sum(op.k == N // 2 for op in report.ops) == 6 * 6
    assert sum(op.k == math.ceil(0.1 * N) for op in report.ops) == 2 * 6


def test_bert_module_annotation_and_the_equivalent_rule_make_the_same_plan(plan_only):
    by_rule = plan_of(tiny_bert(), ratio=0.3, rules=[
        {"match": "bert.encoder.layer.0", "ratio": 0.5},
        {"match": "bert.encoder.layer.1.attention.output", "enabled": False},
    ])

    model = tiny_bert()
    wtacrs_compile.annotate_module(model.bert.encoder.layer[0], ratio=0.5)
    wtacrs_compile.annotate_module(model.bert.encoder.layer[1].attention.output, enabled=False)
    by_annotation = plan_of(model, ratio=0.3)

    assert summary(by_annotation) == summary(by_rule)
    assert {op.module for op in by_annotation.ops} == linears(model)  # FQNs unchanged by the wrapper
    layer0 = [op for op in by_annotation.ops if op.module.startswith("bert.encoder.layer.0.")]
    assert len(layer0) == 6 and all(op.k == N // 2 and op.annotation == {"ratio": 0.5} for op in layer0)
    off = {op.module: op for op in by_annotation.ops}["bert.encoder.layer.1.attention.output.dense"]
    assert off.decision == "exact" and off.annotation == {"enabled": False} and off.rules == []
    assert off.reason == "disabled by annotation annotate(enabled=False)"

    # Both at once: the annotation applies after the rule; the record shows both.
    both = plan_of(model, ratio=0.3, rules=[{"match": "bert.encoder.layer.0", "ratio": 0.25, "min_k": 20}])
    layer0 = [op for op in both.ops if op.module.startswith("bert.encoder.layer.0.")]
    assert all((op.ratio, op.k, op.rules) == (0.5, 20, [0]) for op in layer0)  # min_k from the rule

    wtacrs_compile.unannotate_module(model.bert.encoder.layer[0])
    wtacrs_compile.unannotate_module(model.bert.encoder.layer[1].attention.output)
    assert "forward" not in model.bert.encoder.layer[0].__dict__


class Regions(nn.Module):
    """Annotated in code: a `with` region, a decorated method, nesting, and a plain op."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        with wtacrs_compile.annotate(ratio=0.5, min_k=2):
            x = torch.relu(self.a(x))
            with wtacrs_compile.annotate(enabled=False):
                x = torch.relu(self.b(x))
        x = torch.relu(self.third(x))
        return self.d(x)

    @wtacrs_compile.annotate(ratio=0.25)
    def third(self, x):
        return self.c(x)


@pytest.mark.parametrize("backward_meta", ["kept", "stripped"])
def test_annotations_in_a_forward_reach_the_backward_matmuls_without_graph_breaks(plan_only, monkeypatch, backward_meta):
    if backward_meta == "stripped":  # a torch that does not copy meta["custom"] to backward nodes
        from wtacrs_compile.graph_utils import tangent_dependent
        from wtacrs_compile.passes import joint_pass

        def site_context(graph, sites):
            for node in tangent_dependent(graph):
                node.meta.pop("custom", None)
            return original(graph, sites)

        original = joint_pass.site_context
        monkeypatch.setattr(joint_pass, "site_context", site_context)
    torch.manual_seed(0)
    model = Regions()
    backend = wtacrs_compile.backend(memory_budget=None, ratio=0.125, mode="all")
    x = torch.randn(64, 16)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    compiled(x).sum().backward()
    ops = {op.module: op for op in backend.reports[0].ops}
    assert (ops["a"].annotation, ops["a"].k) == ({"ratio": 0.5, "min_k": 2}, 32)
    # nested: merged setting by setting, the inner region winning
    assert ops["b"].annotation == {"ratio": 0.5, "min_k": 2, "enabled": False} and ops["b"].decision == "exact"
    assert (ops["c"].annotation, ops["c"].k) == ({"ratio": 0.25}, 16)
    assert (ops["d"].annotation, ops["d"].k, ops["d"].decision) == ({}, 8, "memory")
    # Re-annotating a module recompiles with the new settings (Dynamo guards on them).
    wtacrs_compile.annotate_module(model.d, ratio=0.75)
    compiled(x).sum().backward()
    assert len(backend.reports) == 2
    assert {op.module: op.k for op in backend.reports[1].ops}["d"] == 48
    # A deep copy of an annotated module is annotated, and calls its own forward.
    clone = copy.deepcopy(model)
    assert clone.d.forward.__self__ is clone.d
    assert wtacrs_compile.annotate.__module__ == "wtacrs_compile.annotate"


def test_typo_rule_warns_once_naming_the_rule_and_the_closest_modules(plan_only):
    model = tiny_bert(layers=2)
    backend = wtacrs_compile.backend(memory_budget=None, mode="all", ratio=0.3, rules=[
        {"match": "clasifier", "enabled": True},
        {"match": "encoder.layers.1.*", "ratio": 0.2},
        {"module_type": "BertSelfAtention", "ratio": 0.2},
        {"match": "*.attention.output.*", "enabled": False},  # fine: no warning
    ])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(model, backend)
    messages = [str(w.message) for w in caught if issubclass(w.category, WTACRSRuleWarning)]
    assert len(messages) == 3, messages
    typo, layers, typ = messages
    assert "rule 0 Rule(match='clasifier', enabled=True) matches no op" in typo
    assert "did you mean match='classifier'?" in typo and "closest module names: classifier" in typo
    assert "rule 1 Rule(match='encoder.layers.1.*', ratio=0.2)" in layers
    assert "did you mean match='encoder.layer.1.*'?" in layers and "bert.encoder.layer.1" in layers
    assert "rule 2" in typ and "closest types: BertSelfAttention" in typ

    # Another graph of the same backend (a new input shape) does not repeat them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ids = torch.randint(0, 100, (BATCH, SEQ // 2))
        torch.compile(model, backend=backend, dynamic=False)(input_ids=ids, labels=torch.tensor([0, 1])).loss.backward()
    assert len(backend.reports) == 2
    assert not [w for w in caught if issubclass(w.category, WTACRSRuleWarning)]


# ------------------------------------------------------------------------------------------
# Recompilation: a rule change is a new plan and a new cache key, never a stale graph


def test_changing_a_rule_recompiles_with_a_new_pass_uuid():
    from wtacrs_compile.passes.joint_pass import WTACRSJointPass
    from wtacrs_compile.report import CompileReport

    model = tiny_bert(layers=1)
    ids, labels = bert_inputs()
    value = model.bert.encoder.layer[0].attention.self.value
    eager = model(input_ids=ids, labels=labels).loss
    eager.backward()
    exact_grad = value.weight.grad.clone()

    base = {"ratio": 0.3, "mode": "all", "ops": ["linear"]}  # bmms would sample dV too
    changed = dict(base, rules=[{"match": "layer.0.attention.self.value", "enabled": False}])
    uuids = [
        WTACRSJointPass(WTACRSConfig.from_options(o), frozenset({"primals_1"}), (0,), CompileReport(config={})).uuid()
        for o in (base, changed, dict(base))
    ]
    assert uuids[0] != uuids[1] and uuids[0] == uuids[2]

    wtacrs_compile.clear_reports()
    grads = []
    for options in (base, changed, base):  # by name, as from a training config
        model.zero_grad(set_to_none=True)
        loss = torch.compile(model, backend="wtacrs", options=options)(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-5)
        grads.append(value.weight.grad.clone())
    # The changed rule compiled anew; going back to the first options reuses the first graph.
    reports = wtacrs_compile.recent_reports()
    assert len(reports) == 2
    assert [r.config["rules"] for r in reports] == [[], [dataclasses.asdict(Rule(**changed["rules"][0]))]]
    plans = [{op.module: op.decision for op in r.ops} for r in reports]
    name = "bert.encoder.layer.0.attention.self.value"
    assert plans[0][name] == "memory" and plans[1][name] == "exact"
    assert {m for m in plans[0] if plans[0][m] != plans[1][m]} == {name}
    # The code that ran follows the plan: the value weight gradient is exact only under the
    # rule that disables it (a stale graph would sample it, or leave it exact after it).
    torch.testing.assert_close(grads[1], exact_grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(grads[0], exact_grad, rtol=1e-2, atol=1e-4)
    assert not torch.allclose(grads[2], exact_grad, rtol=1e-2, atol=1e-4)
