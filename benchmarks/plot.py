"""Plots from the results files: one point per configuration.

    python benchmarks/plot.py        # -> results/memory_time-<model>.png, results/accuracy_{minilm,fmnist}*.png

memory_time-<model>.png: saved-activation bytes (x) against step time as a ratio to Inductor
(y), and peak step RSS (x) against the same, with the exact frontier (Inductor under
activation_memory_budget) and the wtacrs frontier (compute mode at the same budgets) drawn as
lines and each point's spread over interleaved rounds as a vertical bar; accuracy_minilm*.png: MiniLM test accuracy (y)
against saved-activation bytes of the MiniLM memory run (x) for the configurations both runs
have, with the spread over seeds as error bars.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

RESULTS = Path(__file__).resolve().parent.parent / "results"
COLORS = {"eager": "tab:gray", "inductor": "tab:blue", "wtacrs": "tab:red"}


def _color(e):
    kind = e["config"]["kind"]
    if kind == "inductor" and e["config"].get("budget") is not None:
        return "tab:cyan"
    if kind == "wtacrs" and e["config"].get("mode") in ("memory", "all"):
        return "tab:orange"
    return COLORS[kind]


def _frontier(ax, entries, key, ykey, which, color, label):
    """Connect one family's points (the exact budgets, or wtacrs's) in order of bytes."""
    pts = sorted((e[key] / 2**20, e[ykey]) for e in entries
                 if e["config"].get("frontier") == which and e.get(key))
    if len(pts) > 1:
        ax.plot(*zip(*pts), color=color, lw=1, alpha=0.7, label=label)


def plot_memory(path: Path) -> Path:
    res = json.loads(path.read_text())
    ok = [e for e in res["results"] if e.get("status") == "ok"]
    # Step time against bytes; a run without timed rounds (--rounds 0) plots the backward's
    # matmul FLOPs instead.
    ykey = "step_ratio_vs_inductor"
    ylabel = "median step time / Inductor's (same run)"
    if any(e.get("step_ratio_ci95") for e in ok):
        ylabel += "\nthick: 95 % interval of the median; thin: min-max of the rounds"
    elif any(e.get("step_ratio_min_max") for e in ok):
        ylabel += "\nlines: min-max of the rounds"
    if not any(e.get(ykey) for e in ok):
        ykey, ylabel = "backward_flops_vs_inductor", "backward matmul FLOPs / Inductor's (counted)"
    ok = [e for e in ok if e.get(ykey)]
    panels = [("saved_bytes", "saved activations (MiB; eager: autograd saved tensors)")]
    if any(e.get("peak_step_bytes") for e in ok):  # a run with --no-peak has no second panel
        panels.append(("peak_step_bytes", "peak RSS of one training step minus RSS before it (MiB)"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 5), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for e in ok:
            if not e.get(key):
                continue
            x, y = e[key] / 2**20, e[ykey]
            ax.scatter(x, y, color=_color(e), s=40)
            ax.annotate(e["name"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            if ykey == "step_ratio_vs_inductor" and e.get("step_ratio_min_max"):  # spread over rounds
                lo, hi = e["step_ratio_min_max"]
                ax.vlines(x, lo, hi, color=_color(e), lw=0.6, alpha=0.3)
            if ykey == "step_ratio_vs_inductor" and e.get("step_ratio_ci95"):  # how well the median is known
                lo, hi = e["step_ratio_ci95"]
                ax.vlines(x, lo, hi, color=_color(e), lw=3, alpha=0.8)
        _frontier(ax, ok, key, ykey, "exact", "tab:cyan", "exact: activation_memory_budget 1.0 / 0.5 / 0.3 / 0.1")
        _frontier(ax, ok, key, ykey, "wtacrs", "tab:red", "wtacrs compute mode at the same budgets")
        ax.axhline(1.0, color="tab:blue", lw=0.5, ls="--")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right")
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    m = res["model"]
    layers = f", {m['layers_reduced_to']} layers" if m.get("layers_reduced_to") else ""
    fig.suptitle(f"{m['name']} batch {m['batch']}{layers} — {res['machine']['device']}, torch {res['machine']['torch']}")
    fig.tight_layout()
    if res.get("note"):  # e.g. step times taken on a loaded machine
        import textwrap

        fig.text(0.01, 0.005, textwrap.fill("Note: " + res["note"], 200), fontsize=6, va="bottom")
        fig.subplots_adjust(bottom=0.2)
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_accuracy(acc_path: Path, mem_path: Optional[Path],
                  title: str = "MiniLM on movie-review sentences: accuracy vs activation memory") -> Path:
    acc = json.loads(acc_path.read_text())
    mem = json.loads(mem_path.read_text()) if mem_path is not None and mem_path.exists() else None
    saved = {}
    if mem:
        saved = {e["name"]: e for e in mem["results"] if e.get("saved_bytes")}
    alias = {"exact (inductor)": "inductor"}
    fig, ax = plt.subplots(figsize=(7, 5))
    unplaced = []
    for i, (name, s) in enumerate(acc["summary"].items()):
        e = saved.get(alias.get(name, name))
        if saved and not e:  # no memory figure for it: an x position would be made up
            unplaced.append(f"{name}: {s['mean'] * 100:.1f}%")
            continue
        x = e["saved_bytes"] / 2**20 if e else i
        ax.errorbar(x, s["mean"] * 100, yerr=s["std"] * 100, fmt="o",
                    color="tab:blue" if name.startswith("exact") else "tab:red", capsize=3)
        label = name + (f"  (step x{e['step_ratio_vs_inductor']:.2f})" if e and e.get("step_ratio_vs_inductor") else "")
        ax.annotate(label, (x, s["mean"] * 100), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("saved activations, MiniLM memory run (MiB)" if saved else "configuration")
    ax.set_ylabel("test accuracy % (mean +- std over seeds)")
    ax.set_title(title)
    if unplaced:
        ax.text(0.01, 0.01, "not in the memory run, so not placed: " + "; ".join(unplaced),
                transform=ax.transAxes, fontsize=7, va="bottom")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = acc_path.with_suffix(".png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> None:
    for p in sorted(RESULTS.glob("memory_time-*.json")):
        print(plot_memory(p))
    for acc in sorted(RESULTS.glob("accuracy_minilm*.json")):
        print(plot_accuracy(acc, RESULTS / "memory_time-minilm.json"))
    for acc in sorted(RESULTS.glob("accuracy_fmnist*.json")):  # no memory run of this small ViT
        print(plot_accuracy(acc, None, "small ViT on Fashion-MNIST: accuracy per configuration"))


if __name__ == "__main__":
    main()
