"""Per-op relative error of the estimated weight gradients against the exact ones, on the
MiniLM movie-review task's real weights and a real (padded) batch.

    python benchmarks/grad_error.py            # -> results/grad_error-minilm.json and .png

For each configuration the same batch is run ``--draws`` times (fresh draws each time) and,
per linear layer, the relative error ``E ||dW_est - dW|| / ||dW||`` is reported (mean over
draws), with ``dW`` the exact gradient of plain Inductor on the same weights and batch.
Configurations: forward draws with ``p ∝ ||x_i||`` (``mode="all"``, the paper's way without
cached norms, which the first release used), and backward draws with the exact
``p ∝ ||x_i|| ||g_i||`` (``mode="compute"``, the default); each with the paper's i.i.d. draws
(``sampling="iid"``) and with systematic ones (the default); forward draws also with the
last layer's ``[CLS]``-only gradients read exactly (``live_rows``, the default), with the
padded rows left out (``padding_mask``, the default), and with the gradient-norm feedback (``grad_norm_feedback``: cached ``||g_i||`` per position without
example ids, per example with them; Q/K/V's shared draw uses the root of their summed
squares).  Dropout is off (eval-mode dropout
with train-mode autograd) so the exact gradient is deterministic.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import common  # noqa: E402

CONFIGS = {
    "forward draw, ‖x‖ (mode all, i.i.d.)": {"mode": "all", "memory_budget": None, "sampling": "iid",
                                             "live_rows": False, "padding_mask": None},
    "forward draw, ‖x‖ (mode all, systematic)": {"mode": "all", "memory_budget": None, "live_rows": False,
                                                 "padding_mask": None},
    # + zero rows: ops whose G the graph proves zero outside the [CLS] rows read those rows exactly
    "forward draw, ‖x‖ + live rows (mode all, systematic)": {"mode": "all", "memory_budget": None,
                                                             "padding_mask": None},
    # + the padding prior (the default): rows attention_mask pads get p = 0
    "forward draw, ‖x‖ + live rows + padding (mode all)": {"mode": "all", "memory_budget": None},
    # + feedback: the cache filled by one step on the same batch and weights (an optimistic
    # bound on a cache an epoch old); without ids the per-position running estimate
    "forward draw, ‖x‖·ĝ per position + live rows + padding (mode all, no ids)": {
        "mode": "all", "memory_budget": None, "grad_norm_feedback": True},
    "forward draw, ‖x‖·ĝ per example + live rows + padding (mode all, example ids)": {
        "mode": "all", "memory_budget": None, "grad_norm_feedback": True, "ids": True},
    "backward draw, ‖x‖·‖g‖ (compute, i.i.d.)": {"mode": "compute", "sampling": "iid"},
    "backward draw, ‖x‖·‖g‖ (compute, systematic: default)": {"mode": "compute"},
}


def grads(model, fn, batch):
    model.zero_grad(set_to_none=True)
    fn(**batch).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()
            if p.grad is not None and n.endswith(".weight") and p.dim() == 2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--draws", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--out", default=str(common.RESULTS / "grad_error-minilm.json"))
    args = p.parse_args()
    import transformers
    import wtacrs_compile

    import accuracy_minilm as acc

    common.raise_recompile_limits()
    train, _, _ = acc.load_sentences(3000, 1000)
    tok = transformers.AutoTokenizer.from_pretrained(str(common.MINILM_DIR))
    ids, mask, labels = acc.encode(tok, train[: args.batch], 64)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    torch.manual_seed(0)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(common.MINILM_DIR), num_labels=2, attn_implementation="eager",
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = common.WithLoss(hf, "hf").train()

    exact = grads(model, torch.compile(model), batch)
    torch._dynamo.reset()
    rows = {}
    for name, options in CONFIGS.items():
        options = dict(options)
        with_ids = options.pop("ids", False)
        backend = wtacrs_compile.backend(ratio=args.ratio, **options)
        compiled = torch.compile(model, backend=backend)
        if with_ids:
            def fn(**kw):
                with backend.example_ids(torch.arange(args.batch)):
                    return compiled(**kw)
        else:
            fn = compiled
        torch.manual_seed(1)
        if options.get("grad_norm_feedback"):
            grads(model, fn, batch)  # fills the cache; not counted
        errors = {}
        for _ in range(args.draws):
            g = grads(model, fn, batch)
            for n, e in exact.items():
                errors.setdefault(n, []).append(float((g[n] - e).norm() / e.norm().clamp_min(1e-30)))
        torch._dynamo.reset()
        decisions = {op.module: op.decision for op in backend.reports[0].ops}
        # linear layers only (the ops the backend matches), exact ones included (error 0)
        rows[name] = {n: {"rel_error": statistics.mean(v), "decision": decisions[n.rsplit(".", 1)[0]]}
                      for n, v in errors.items() if n.rsplit(".", 1)[0] in decisions}
        print(f"{name}: median rel. error over sampled ops "
              f"{statistics.median(r['rel_error'] for r in rows[name].values() if r['rel_error'] > 0):.3f}", flush=True)

    padding = float(1 - mask.float().mean())
    out = {
        "benchmark": "grad_error",
        "command": "python benchmarks/grad_error.py " + " ".join(sys.argv[1:]),
        "machine": common.machine(),
        "task": {"model": "all-MiniLM-L6-v2 real weights, dropout off", "batch": args.batch, "max_len": 64,
                 "ratio": args.ratio, "draws": args.draws, "padding_fraction": padding},
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "results": rows,
    }
    Path(args.out).write_text(json.dumps(out, indent=1))
    plot(out, Path(args.out).with_suffix(".png"))
    print(f"wrote {args.out}")


def plot(out, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in next(iter(out["results"].values()))]
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(out["results"])
    for i, (cfg, rows) in enumerate(out["results"].items()):
        ax.bar([j + i * width for j in range(len(names))], [rows[n]["rel_error"] for n in names], width, label=cfg)
    ax.set_xticks([j + width / 2 for j in range(len(names))])
    ax.set_xticklabels([n.replace("model.bert.encoder.", "").replace(".weight", "") for n in names],
                       rotation=90, fontsize=6)
    ax.set_ylabel("E ||dW_est - dW|| / ||dW||")
    ax.set_title(f"MiniLM weight-gradient error at ratio {out['task']['ratio']} "
                 f"({out['task']['padding_fraction'] * 100:.0f}% padding), {out['task']['draws']} draws")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
