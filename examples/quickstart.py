"""Fine-tune a small BERT for a few steps with backend="wtacrs", side by side with plain
torch.compile, and print the loss and the saved-activation bytes of both.

    python examples/quickstart.py [--steps 20] [--ratio 0.3]

The model is built from a config (no download).  The task is synthetic but learnable: is
token 7 in the sentence?
"""

import argparse
import copy

import torch
from transformers import BertConfig, BertForSequenceClassification

import wtacrs_compile


def batch(gen, size=16, length=64, vocab=500):
    ids = torch.randint(10, vocab, (size, length), generator=gen)
    labels = torch.randint(0, 2, (size,), generator=gen)
    marks = torch.randint(1, length, (size, 8), generator=gen)
    for row in torch.nonzero(labels == 1).flatten().tolist():
        ids[row, marks[row]] = 7
    return ids, labels


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.3)
    args = parser.parse_args()

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=500, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=512, max_position_embeddings=64, attn_implementation="eager",
    )
    exact_model = BertForSequenceClassification(config)
    wtacrs_model = copy.deepcopy(exact_model)

    backend = wtacrs_compile.backend(ratio=args.ratio)  # same as backend="wtacrs", keeps reports
    runs = {
        "torch.compile": torch.compile(exact_model),
        f"wtacrs ratio={args.ratio}": torch.compile(wtacrs_model, backend=backend),
    }
    models = {"torch.compile": exact_model, f"wtacrs ratio={args.ratio}": wtacrs_model}
    optims = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}

    gen = torch.Generator().manual_seed(0)
    print(f"{'step':>4}  " + "  ".join(f"{name:>20}" for name in runs))
    for step in range(args.steps):
        ids, labels = batch(gen)
        losses = []
        for name, compiled in runs.items():
            loss = compiled(input_ids=ids, labels=labels).loss
            loss.backward()
            optims[name].step()
            optims[name].zero_grad()
            losses.append(loss.item())
        print(f"{step:>4}  " + "  ".join(f"{v:>20.4f}" for v in losses))

    report = backend.reports[0]
    print()
    print(f"{'module':<44} {'decision':<9} {'k':>5}  activation bytes  reason")
    for op in report.ops:
        print(f"{op.module:<44} {op.decision:<9} {op.k:>5}  {op.saved_bytes_before:>16,}  {op.reason[:90]}")
    base, exact, ours = report.inductor_saved_bytes, report.baseline_saved_bytes, report.compiled_saved_bytes
    budget = wtacrs_compile.WTACRSConfig().memory_budget
    print()
    rows = [
        ("saved activations, plain torch.compile", base, None),
        (f"  exact: recomputation (memory_budget={budget:g}), live rows", exact, base),
        ("  wtacrs (that, plus weight gradients drawn)", ours, base),
    ]
    flops = {name: report.flops[name]["backward"] for name in ("inductor", "baseline", "compiled")}
    rows += [
        ("backward matmul FLOPs, plain torch.compile", flops["inductor"], None),
        ("  exact (recomputation, live rows)", flops["baseline"], flops["inductor"]),
        ("  wtacrs (draws pay for it)", flops["compiled"], flops["inductor"]),
    ]
    for label, value, ref in rows:
        print(f"{label:<54}: {value:>14,}" + (f"  ({value / ref:.2f}x)" if ref else ""))


if __name__ == "__main__":
    main()
