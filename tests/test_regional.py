"""Regional compilation: one backend compiles each repeated block in place; the block's graph
is planned once and serves every layer."""

import pytest
import torch

import wtacrs_compile

from tiny_models import tiny_bert_classifier


def _batch(gen):
    return torch.randint(5, 100, (4, 16), generator=gen), torch.randint(0, 2, (4,), generator=gen)


def test_each_layer_compiled_in_place_shares_one_planned_graph():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_bert_classifier(layers=3).train()
    backend = wtacrs_compile.backend(min_draw_gain=0)  # one backend object: one list of reports
    for layer in model.bert.encoder.layer:
        layer.compile(backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # the second step reuses the compiled block: no new report
        ids, labels = _batch(gen)
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=labels).loss.backward()
    train = [r for r in backend.reports if r.ops]
    assert len(train) == 1, [len(r.ops) for r in backend.reports]
    report = train[0]
    # Names are relative to the compiled block: rules select "intermediate.dense", not
    # "bert.encoder.layer.0.intermediate.dense".
    decisions = {op.module: op.decision for op in report.ops}
    assert decisions == {
        "attention.self.query": "compute", "attention.self.key": "compute",
        "attention.self.value": "compute", "attention.output.dense": "compute",
        "intermediate.dense": "compute", "output.dense": "compute",
    }, decisions
    assert report.compiled_saved_bytes is not None and report.compile_seconds["joint_pass"] > 0
    # every layer trained through the compiled block (the head and embeddings run eagerly)
    for i in range(3):
        grad = model.bert.encoder.layer[i].intermediate.dense.weight.grad
        assert grad is not None and grad.abs().sum() > 0


def test_regional_rules_use_block_relative_names():
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = tiny_bert_classifier(layers=2).train()
    backend = wtacrs_compile.backend(rules=[{"match": "intermediate.dense", "enabled": False}], min_draw_gain=0)
    for layer in model.bert.encoder.layer:
        layer.compile(backend=backend)
    ids, labels = _batch(torch.Generator().manual_seed(1))
    model(input_ids=ids, labels=labels).loss.backward()
    (report,) = [r for r in backend.reports if r.ops]
    decisions = {op.module: op.decision for op in report.ops}
    assert decisions["intermediate.dense"] == "exact"
    assert decisions["output.dense"] == "compute"
