"""Hugging Face ``Trainer`` through the documented way in: ``compile_module`` in place."""

import pytest
import torch

import wtacrs_compile

from tiny_models import tiny_bert_classifier


def test_three_trainer_steps_run_the_rewritten_graph(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    model = tiny_bert_classifier()
    backend = wtacrs_compile.compile_module(model, ratio=0.3, min_draw_gain=0)  # tiny test layers: below the draw's break-even
    gen = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": torch.randint(5, 100, (16,), generator=gen), "labels": int(i % 2)}
        for i in range(24)
    ]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    # The backend compiled the training graph and rewrote its weight gradients ...
    train = [r for r in backend.reports if r.ops]
    assert train, "the Trainer ran the compiled module"
    decisions = {op.module: op.decision for op in train[0].ops}
    assert decisions["bert.encoder.layer.0.attention.self.key"] == "compute"
    assert decisions["bert.encoder.layer.0.intermediate.dense"] == "live_rows"  # [CLS]-only G
    assert decisions["classifier"] == "exact"
    assert train[0].compiled_saved_bytes is not None
    # ... and the steps trained the model through it.
    w = "bert.encoder.layer.0.intermediate.dense.weight"
    assert not torch.equal(before[w], model.get_parameter(w))
