"""Accuracy of a small timm ViT trained on Fashion-MNIST, exact torch.compile against
backend="wtacrs" at several ratios, same seed, steps and hyper-parameters.

    sudo apt-get install dataset-fashion-mnist               # once (Debian package, 31 MB)
    python benchmarks/accuracy_fmnist.py --seeds 0 1 2       # -> results/accuracy_fmnist.json

Default configurations: exact, and backend="wtacrs" with its defaults at ratio 0.5 and 0.3.

Model: timm VisionTransformer, 28x28, 1 channel, patch 7 (16 tokens + class token), width 192,
depth 4, 3 heads (1.8M parameters), trained from scratch (no pretrained ViT weights install
offline; ../shared/DATA.md).  Data: 20,000 train / 2,000 test images (the first of each
file), batch 128 (last incomplete batch dropped), AdamW lr 1e-3, 3 epochs.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import wtacrs_compile  # noqa: E402

import common  # noqa: E402

DATA = Path("/usr/share/datasets/fashion-mnist")
CONFIGS = {
    "exact (inductor)": {"kind": "inductor"},
    # backend="wtacrs" with nothing else but the ratio: compute mode, memory_budget=0.1
    "wtacrs default r=0.5": {"kind": "wtacrs", "ratio": 0.5},
    "wtacrs default": {"kind": "wtacrs"},
    "wtacrs default r=0.1": {"kind": "wtacrs", "ratio": 0.1},
    "wtacrs r=0.5": {"kind": "wtacrs", "ratio": 0.5, "mode": "memory"},
    "wtacrs r=0.3": {"kind": "wtacrs", "ratio": 0.3, "mode": "memory"},
    "wtacrs r=0.3 all": {"kind": "wtacrs", "ratio": 0.3, "mode": "all"},
}


def _idx(name: str) -> np.ndarray:
    raw = gzip.open(DATA / name).read()
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(n_train: int, n_test: int):
    if not DATA.exists():
        raise SystemExit(f"{DATA} is missing: apt-get install dataset-fashion-mnist")
    def prep(x):
        x = torch.from_numpy(x.copy()).float().div_(255.0).unsqueeze(1)
        return (x - 0.2860) / 0.3530
    xtr = prep(_idx("train-images-idx3-ubyte.gz")[:n_train])
    ytr = torch.from_numpy(_idx("train-labels-idx1-ubyte.gz")[:n_train].astype(np.int64))
    xte = prep(_idx("t10k-images-idx3-ubyte.gz")[:n_test])
    yte = torch.from_numpy(_idx("t10k-labels-idx1-ubyte.gz")[:n_test].astype(np.int64))
    return xtr, ytr, xte, yte


def make_model(seed: int):
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=192,
                             depth=4, num_heads=3)


def train_one(name, cfg, seed, data, args):
    xtr, ytr, xte, yte = data
    model = common.WithLoss(make_model(seed), "timm").train()
    fn, rec = common.compile_config(model, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout
    wtacrs_compile.manual_seed(seed)  # backward draws: their own stream (dropout stays paired)
    steps_per_epoch = len(xtr) // args.batch
    t0 = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen)
        for s in range(steps_per_epoch):
            idx = order[s * args.batch:(s + 1) * args.batch]
            opt.zero_grad(set_to_none=True)
            loss = fn(pixel_values=xtr[idx], labels=ytr[idx])
            loss.backward()
            opt.step()
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        correct = sum((model.model(xte[i:i + 500]).argmax(-1) == yte[i:i + 500]).sum().item()
                      for i in range(0, len(xte), 500))
    acc = correct / len(xte)
    out = {"config": name, "seed": seed, "accuracy": acc, "train_s": train_s,
           "steps": steps_per_epoch * args.epochs, "final_loss": loss.item()}
    if rec is not None:
        out.update(rec.totals())
    print(f"  seed {seed}  {name:<18} acc {acc * 100:6.2f}%  {train_s:6.1f} s", flush=True)
    return out


def main():
    args = common.accuracy_parser(
        __doc__, CONFIGS, ["exact (inductor)", "wtacrs default r=0.5", "wtacrs default"], "accuracy_fmnist.json",
        epochs=3, train=20000, test=2000, batch=128, lr=1e-3,
    ).parse_args()
    common.raise_recompile_limits()
    data = load(args.train, args.test)
    out_path = Path(args.out)
    previous = json.loads(out_path.read_text()) if out_path.exists() else {}
    runs = [r for r in previous.get("runs", []) if not (r["seed"] in args.seeds and r["config"] in args.configs)]
    for seed in args.seeds:
        for name in args.configs:
            try:
                runs.append(train_one(name, CONFIGS[name], seed, data, args))
            except Exception as e:
                import traceback
                runs.append({"config": name, "seed": seed, "status": "failed", "error": f"{type(e).__name__}: {e}",
                             "traceback": traceback.format_exc()[-3000:]})
                print(f"  seed {seed}  {name} FAILED: {e}", flush=True)
            torch._dynamo.reset()
            out = {
                "benchmark": "accuracy_fmnist",
                "command": common.merged_command("benchmarks/accuracy_fmnist.py", runs, sys.argv[1:]),
                "machine": common.machine(),
                "task": {"data": "Fashion-MNIST (Debian dataset-fashion-mnist)", "train": args.train,
                         "test": args.test, "batch": args.batch, "epochs": args.epochs,
                         "optimizer": f"AdamW lr={args.lr}",
                         "model": "timm VisionTransformer 28x28 patch 7 width 192 depth 4 heads 3, from scratch"},
                "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                "summary": summarize(runs),
                "runs": runs,
            }
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(out, indent=1))


def summarize(runs):
    return common.summarize_accuracy(runs, list(CONFIGS))


if __name__ == "__main__":
    main()
