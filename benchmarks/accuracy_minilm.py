"""Accuracy on real data: all-MiniLM-L6-v2 (real weights) fine-tuned on movie-review sentences,
exact torch.compile against backend="wtacrs" at several ratios, same seed, steps and
hyper-parameters for every configuration.

    bash benchmarks/fetch_data.sh                      # once: weights + sentences into .cache/
    python benchmarks/accuracy_minilm.py --seeds 0 1 2   # -> results/accuracy_minilm.json
    python benchmarks/accuracy_minilm.py --train 1500 --epochs 2 --out results/accuracy_minilm-2epochs.json \
        --configs "exact (inductor)" "wtacrs r=0.3" "wtacrs r=0.3 feedback"   # feedback needs a previous epoch

Data: movieReviewSnippets_GroundTruth.txt from the vaderSentiment 3.3.2 source archive
(Rotten Tomatoes snippets, label = sign of the mean rating, zeros dropped), shuffled with a
fixed data seed; 3,000 train / 1,000 test sentences, max length 64 (padded: static shapes),
batch 32 (the last incomplete batch dropped: 93 steps), AdamW lr 5e-5, one epoch (--epochs).  The
training seed (classifier init, dropout, shuffling order, the sampler's draws) is --seeds; the
backward draws (the default) come from the backend's own stream (``wtacrs_compile.manual_seed``),
so a wtacrs run and the exact run of one seed with the same dropout masks share those masks
and the batch order.  The default ``rng="auto"`` hashes CPU dropout masks: other masks than
Inductor's Philox draws from the same seeds, which the row "exact (wtacrs ratio=1, hashed
dropout)" shares; "wtacrs default philox" shares "exact (inductor)"'s.
Test accuracy is measured in eval mode with the exact forward (wtacrs changes only weight
gradients).
"""

from __future__ import annotations

import contextlib
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import wtacrs_compile  # noqa: E402

import common  # noqa: E402

CONFIGS = {
    "exact (inductor)": {"kind": "inductor"},
    # Exact again with only the dropout stream changed: how far dropout alone moves accuracy.
    # (A wtacrs run with backward draws, the default, sees the exact run's dropout masks: the
    # draws have their own stream, so its gap to the exact row is the estimate's alone.
    # Forward draws, modes memory and all, draw from torch's generator.)
    "exact (inductor) reseeded dropout": {"kind": "inductor", "dropout_seed_offset": 1000},
    # backend="wtacrs" with nothing else: compute mode, r=0.3, memory_budget=0.1, systematic
    # draws, hashed dropout masks on the CPU (rng="auto")
    "wtacrs default": {"kind": "wtacrs"},
    # hashed dropout masks on every device (passes/hash_rng.py: other masks than Inductor's);
    # on the CPU the default's configuration, under the name of the runs before it was
    "wtacrs default hash": {"kind": "wtacrs", "rng": "hash"},
    # Inductor's Philox masks (the default before 2026-12-03): "exact (inductor)"'s masks
    "wtacrs default philox": {"kind": "wtacrs", "rng": "philox"},
    # nothing sampled (ratio 1), hashed dropout masks: "wtacrs default hash"'s gap to this row
    # is the estimate's alone, its gap to "exact (inductor)" the estimate's and the masks'
    "exact (wtacrs ratio=1, hashed dropout)": {"kind": "wtacrs", "ratio": 1.0, "rng": "hash"},
    "wtacrs default iid": {"kind": "wtacrs", "sampling": "iid"},  # the paper's i.i.d. draws
    "wtacrs default r=0.5": {"kind": "wtacrs", "ratio": 0.5},
    "wtacrs default r=0.1": {"kind": "wtacrs", "ratio": 0.1},
    "wtacrs default r=0.2": {"kind": "wtacrs", "ratio": 0.2},
    "wtacrs r=0.5": {"kind": "wtacrs", "ratio": 0.5, "mode": "memory"},
    "wtacrs r=0.3": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory"},
    # forward draws where they save bytes, no budget: the first release's default (8.9 points
    # lost with bmm, 1.1 without); under the default budget the exact recompute leaves memory
    # mode nothing to draw (every op exact)
    "wtacrs r=0.3 memory no budget": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory", "memory_budget": None},
    # the same without the padding prior (padding_mask=None): the forward draws see ||x_i|| only
    "wtacrs r=0.3 memory no budget no padding prior": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory",
                                                       "memory_budget": None, "padding_mask": None},
    # with gradient-norm feedback keyed by example ids (from the second epoch on)
    "wtacrs r=0.3 memory no budget feedback": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory",
                                               "memory_budget": None, "feedback": True},
    "wtacrs r=0.1": {"kind": "wtacrs", "ratio": 0.1, "mode": "memory"},
    "wtacrs r=0.3 all": {"kind": "wtacrs", "ratio": 0.3, "mode": "all"},
    # every linear drawn in forward with all the forward-draw probabilities that need no
    # example ids: live rows, the padding prior, the per-position gradient-norm cache
    "wtacrs r=0.3 all feedback per position": {"kind": "wtacrs", "ratio": 0.3, "mode": "all",
                                               "memory_budget": None, "grad_norm_feedback": True},
    "wtacrs r=0.1 all": {"kind": "wtacrs", "ratio": 0.1, "mode": "all"},
    # the paper's gradient-norm feedback: needs a previous epoch to have cached norms
    "wtacrs r=0.3 feedback": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory", "feedback": True},
}
DEFAULT_CONFIGS = ["exact (inductor)", "exact (wtacrs ratio=1, hashed dropout)", "wtacrs default"]


def load_sentences(n_train: int, n_test: int, data_seed: int = 0):
    if not common.REVIEWS.exists():
        raise SystemExit(f"{common.REVIEWS} is missing: run benchmarks/fetch_data.sh first")
    rows = []
    for line in common.REVIEWS.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.strip().split("\t")
        if len(parts) < 3:
            continue
        try:
            rating = float(parts[1])
        except ValueError:
            continue
        if rating == 0:
            continue
        rows.append((parts[2], int(rating > 0)))
    random.Random(data_seed).shuffle(rows)
    return rows[:n_train], rows[n_train:n_train + n_test], len(rows)


def encode(tokenizer, rows, max_len):
    enc = tokenizer([t for t, _ in rows], padding="max_length", truncation=True, max_length=max_len,
                    return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"], torch.tensor([y for _, y in rows])


@torch.no_grad()
def evaluate(model, ids, mask, labels, batch=128):
    model.eval()
    correct = 0
    for i in range(0, len(ids), batch):
        logits = model.model(input_ids=ids[i:i + batch], attention_mask=mask[i:i + batch]).logits
        correct += (logits.argmax(-1) == labels[i:i + batch]).sum().item()
    model.train()
    return correct / len(ids)


def train_one(name, cfg, seed, base_state, tokenized, args):
    import transformers

    ids, mask, labels, tids, tmask, tlabels = tokenized
    torch.manual_seed(seed)
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(common.MINILM_DIR), num_labels=2, attn_implementation="eager")
    hf.classifier.load_state_dict(base_state(seed))  # same classifier init per seed for every config
    model = common.WithLoss(hf, "hf").train()
    fn, rec = common.compile_config(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    per_epoch = len(ids) // args.batch
    steps = per_epoch * args.epochs
    torch.manual_seed(seed + cfg.get("dropout_seed_offset", 0))  # dropout
    wtacrs_compile.manual_seed(seed)  # the sampler's draws: their own stream (wtacrs_compile/rng.py)
    t0 = time.perf_counter()
    losses = []
    for _ in range(args.epochs):
        order = torch.randperm(len(ids), generator=gen)
        for s in range(per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            opt.zero_grad(set_to_none=True)
            # feedback: the batch's example ids key the cached gradient-row norms
            ctx = rec.wtacrs.example_ids(idx) if cfg.get("feedback") else contextlib.nullcontext()
            with ctx:
                loss = fn(input_ids=ids[idx], attention_mask=mask[idx], labels=labels[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    train_s = time.perf_counter() - t0
    acc = evaluate(model, tids, tmask, tlabels)
    out = {"config": name, "seed": seed, "accuracy": acc, "train_s": train_s, "steps": steps,
           "final_loss_mean10": sum(losses[-10:]) / len(losses[-10:])}
    if rec is not None:
        out.update({k: v for k, v in rec.totals().items()})
    print(f"  seed {seed}  {name:<20} acc {acc * 100:6.2f}%  loss(last10) {out['final_loss_mean10']:.4f}  "
          f"{train_s:6.1f} s", flush=True)
    return out


def main():
    p = common.accuracy_parser(__doc__, CONFIGS, DEFAULT_CONFIGS, "accuracy_minilm.json",
                               epochs=1, train=3000, test=1000, batch=32, lr=5e-5)
    p.add_argument("--max-len", type=int, default=64)
    args = p.parse_args()
    import transformers

    common.raise_recompile_limits()
    train, test, total = load_sentences(args.train, args.test)
    tok = transformers.AutoTokenizer.from_pretrained(str(common.MINILM_DIR))
    tokenized = encode(tok, train, args.max_len) + encode(tok, test, args.max_len)

    def classifier_init(seed):
        torch.manual_seed(seed)
        head = torch.nn.Linear(384, 2)
        return head.state_dict()

    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    task = previous.get("task", {})
    if task and (task.get("train"), task.get("test"), task.get("max_len"), task.get("batch"), task.get("epochs", 1)) != (
            args.train, args.test, args.max_len, args.batch, args.epochs):
        raise SystemExit(f"{out_path} holds runs of another task setting ({task}); pass --out for a new file")
    runs = [r for r in previous.get("runs", [])
            if not (r["seed"] in args.seeds and r["config"] in args.configs)]
    hf0 = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(common.MINILM_DIR), num_labels=2, attn_implementation="eager")
    pre = evaluate(common.WithLoss(hf0, "hf"), *tokenized[3:])
    print(f"{total} labelled sentences; {args.train} train / {args.test} test; before fine-tuning "
          f"{pre * 100:.1f}%", flush=True)
    for seed in args.seeds:
        for name in args.configs:
            try:
                runs.append(train_one(name, CONFIGS[name], seed, classifier_init, tokenized, args))
            except Exception as e:
                import traceback
                runs.append({"config": name, "seed": seed, "status": "failed",
                             "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]})
                print(f"  seed {seed}  {name} FAILED: {e}", flush=True)
            torch._dynamo.reset()
            summary = summarize(runs)
            out = {
                "benchmark": "accuracy_minilm",
                "command": common.merged_command("benchmarks/accuracy_minilm.py", runs, sys.argv[1:]),
                "machine": common.machine(),
                "task": {"data": "movieReviewSnippets_GroundTruth.txt (vaderSentiment 3.3.2 sdist)",
                         "sentences": total, "train": args.train, "test": args.test, "max_len": args.max_len,
                         "batch": args.batch, "optimizer": f"AdamW lr={args.lr}", "epochs": args.epochs,
                         "accuracy_before_finetuning": pre},
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "summary": summary,
                "runs": runs,
            }
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=1))
    for name, s in summarize(runs).items():
        print(f"{name:<20} {s['mean'] * 100:6.2f}% +- {s['std'] * 100:.2f} over seeds {s['seeds']}  "
              f"gap to exact {s.get('gap_to_exact', float('nan')) * 100:+.2f} points")


def summarize(runs):
    return common.summarize_accuracy(runs, list(CONFIGS))


if __name__ == "__main__":
    main()
