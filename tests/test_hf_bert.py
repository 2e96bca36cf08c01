"""A Hugging Face BERT built from a config trains under backend="wtacrs"."""

import pytest
import torch
import torch.nn as nn

import wtacrs_compile

transformers = pytest.importorskip("transformers")


def tiny_bert(layers=2):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        vocab_size=200, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=64, attn_implementation="eager",
        problem_type="single_label_classification",  # else HF sets it on call 1: a recompile
    )
    return transformers.BertForSequenceClassification(cfg)


def batches(steps, size=16, length=32):
    """One fixed batch, repeated: the model must fit it (a sanity check of the gradients,
    not of generalisation)."""
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (size, length), generator=gen)
    labels = torch.randint(0, 2, (size,), generator=gen)
    for _ in range(steps):
        yield ids, labels


# Both forward-draw modes are opt-in and slow (46 s for "memory" on CI's 2 cores; "all", the
# paper's every-op forward sampling, repeats the compile for a second plan); memory mode on a
# BERT layer stays in the default run (test_planner.py, test_default_plan.py).
@pytest.mark.parametrize("mode", [pytest.param("all", marks=pytest.mark.slow), pytest.param("memory", marks=pytest.mark.slow)])
def test_bert_trains_20_steps_with_one_record_per_linear(mode):
    model = tiny_bert()
    backend = wtacrs_compile.backend(memory_budget=None, ops=("linear", "bmm"), ratio=0.3, mode=mode)
    compiled = torch.compile(model, backend=backend)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for ids, labels in batches(20):
        loss = compiled(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.6 * sum(losses[:5]) / 5, losses
    assert len(backend.reports) == 1
    report = backend.reports[0]

    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    linear_ops = [op for op in report.ops if op.op == "linear"]  # bmm records come on top
    recorded = [op.module for op in linear_ops]
    assert sorted(recorded) == sorted(linears), "one record per weight-bearing linear"
    by_module = {op.module: op for op in linear_ops}
    assert by_module["classifier"].decision == "exact"
    assert "output head" in by_module["classifier"].reason
    rewritten = [op for op in linear_ops if op.decision in ("memory", "compute")]
    # the last layer's [CLS]-only gradients: Q, attention output and FFN read B rows, exactly
    live = sorted(op.module.split(".", 4)[-1] for op in linear_ops if op.decision == "live_rows")
    assert live == ["attention.output.dense", "attention.self.query", "intermediate.dense", "output.dense"]
    if mode == "all":
        assert len(rewritten) == len(linears) - 2 - len(live)  # all but the head, pooler and live
    else:
        assert rewritten, "the planner found memory-paying ops"
        assert all(op.measured_saving > 0 for op in rewritten)
    for op in rewritten:
        assert op.k == -(-3 * op.shapes["x"][0] // 10)
    assert report.compiled_saved_bytes < report.baseline_saved_bytes
