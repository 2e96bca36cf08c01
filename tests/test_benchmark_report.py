"""docs/results.md's tables are generated from the results files (benchmarks/report.py)."""

import importlib.util
import json
from pathlib import Path

import pytest


def _bench_module(name):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(
        f"bench_{name}", Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


report = _bench_module("report")


def _entry(name, kind, saved, **extra):
    return {"name": name, "config": {"kind": kind}, "status": "ok", "saved_bytes": saved,
            "step_ratio_vs_inductor": 1.0, "compile_s": 1.0, **extra}


def test_table_from_results_file(tmp_path):
    res = {
        "command": "python benchmarks/memory_time.py --model bert-base",
        "machine": {"device": "cpu", "cpu_count": 2, "torch": "2.14.1"},
        "model": {"name": "bert-base", "description": "BERT", "batch": 4, "layers_reduced_to": 2},
        "settings": {"cap_gib": 8.0},
        "time": "now",
        "results": [
            _entry("eager", "eager", 4 * 2**20),
            _entry("inductor", "inductor", 2 * 2**20),
            _entry("wtacrs r=0.3", "wtacrs", 2**20, ops=2, ops_memory=1, ops_compute=0, ops_exact=1),
            {"name": "wtacrs r=0.1", "config": {"kind": "wtacrs"}, "status": "failed", "error": "Boom: x"},
        ],
    }
    (tmp_path / "memory_time-bert-base.json").write_text(json.dumps(res))
    text = report.generate(tmp_path)
    assert "`python benchmarks/memory_time.py --model bert-base`" in text
    assert "| wtacrs r=0.3 | 1.0 |" in text and "| 1/0/1 |" in text
    assert "failed: Boom: x" in text
    assert "reduced 4.00x against eager, 2.00x against Inductor" in text


def test_cpu_time_column_where_recorded(tmp_path):
    res = {
        "command": "python benchmarks/memory_time.py --model minilm --threads 1",
        "machine": {"device": "cpu", "cpu_count": 2, "torch": "2.14.1"},
        "model": {"name": "minilm", "description": "MiniLM", "batch": 32},
        "settings": {"cap_gib": 8.0, "threads": 1},
        "time": "now",
        "results": [
            _entry("inductor", "inductor", 2 * 2**20, cpu_ratio_vs_inductor=1.0),
            _entry("wtacrs default", "wtacrs", 2**20, step_ratio_min_max=[0.9, 1.2], step_ratio_ci95=[0.95, 1.04],
                   cpu_ratio_vs_inductor=0.85, cpu_ratio_min_max=[0.84, 0.87]),
        ],
    }
    (tmp_path / "memory_time-minilm.json").write_text(json.dumps(res))
    text = report.generate(tmp_path)
    assert "CPU time vs Inductor, 1 thread (min-max) |" in text
    row = next(line for line in text.splitlines() if line.startswith("| wtacrs default |"))
    assert "| 1.00x (0.90-1.20; 95 % CI 0.95-1.04) | 0.85x (0.84-0.87) |" in row
    header = next(line for line in text.splitlines() if line.startswith("| configuration"))
    assert row.count("|") == header.count("|")


def test_accuracy_tables_for_both_tasks(tmp_path):
    machine = {"device": "cpu", "torch": "2.14.1"}
    summary = {
        "exact (inductor)": {"seeds": [0, 1], "accuracies": [0.80, 0.82], "mean": 0.81, "std": 0.0141},
        "wtacrs r=0.3": {"seeds": [0, 1], "accuracies": [0.79, 0.80], "mean": 0.795, "std": 0.0071,
                         "gap_to_exact": -0.015, "gap_std": 0.0071},
    }
    runs = [{"config": "wtacrs r=0.1", "seed": 0, "status": "failed", "error": "Boom: y"}]
    (tmp_path / "accuracy_minilm.json").write_text(json.dumps({
        "benchmark": "accuracy_minilm", "command": "python benchmarks/accuracy_minilm.py --seeds 0 1",
        "machine": machine, "time": "t", "summary": summary, "runs": runs,
        "task": {"train": 3000, "test": 1000, "max_len": 64, "batch": 32, "optimizer": "AdamW",
                 "epochs": 1, "accuracy_before_finetuning": 0.5},
    }))
    (tmp_path / "accuracy_fmnist.json").write_text(json.dumps({
        "benchmark": "accuracy_fmnist", "command": "python benchmarks/accuracy_fmnist.py --seeds 0 1",
        "machine": machine, "time": "t", "summary": summary, "runs": [],
        "task": {"model": "tiny ViT", "train": 20000, "test": 2000, "batch": 128, "optimizer": "AdamW",
                 "epochs": 3},
    }))
    text = report.generate(tmp_path)
    assert text.index("movie-review") < text.index("Fashion-MNIST")
    assert "`python benchmarks/accuracy_fmnist.py --seeds 0 1`" in text
    assert text.count("| wtacrs r=0.3 | 79.50 +- 0.71 | 0, 1 | 79.0, 80.0 | -1.50 +- 0.71 |") == 2
    assert "| wtacrs r=0.1 (seed 0) | failed: Boom: y |" in text


def test_results_file_filled_by_several_runs_records_one_command_for_all():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from common import merged_command

    runs = [{"seed": 0, "config": "exact (inductor)"}, {"seed": 2, "config": "wtacrs r=0.3"},
            {"seed": 0, "config": "wtacrs r=0.3"}]
    argv = ["--seeds", "2", "--out", "r.json", "--configs", "wtacrs r=0.3", "--epochs", "2"]
    assert merged_command("benchmarks/accuracy_minilm.py", runs, argv) == (
        "python benchmarks/accuracy_minilm.py --out r.json --epochs 2 --seeds 0 2 "
        "--configs 'exact (inductor)' 'wtacrs r=0.3'"
    )


def test_untimed_run_reports_bytes_and_flops_only(tmp_path):
    # memory_time.py --rounds 0 (a machine that is not quiet): no step time, no compile time,
    # and the backward FLOPs column still filled
    untimed = {"step_ratio_vs_inductor": None, "compile_s": None}
    res = {
        "command": "python benchmarks/memory_time.py --model t5-base --rounds 0",
        "machine": {"device": "cpu", "cpu_count": 2, "torch": "2.14.1"},
        "model": {"name": "t5-base", "description": "T5", "batch": 4},
        "settings": {"cap_gib": 8.0},
        "time": "now",
        "results": [
            _entry("inductor", "inductor", 2 * 2**20, backward_flops_vs_inductor=1.0, **untimed),
            _entry("wtacrs default", "wtacrs", 2**20, backward_flops_vs_inductor=0.93, **untimed),
        ],
    }
    (tmp_path / "memory_time-t5-base.json").write_text(json.dumps(res))
    text = report.generate(tmp_path)
    row = next(line for line in text.splitlines() if line.startswith("| wtacrs default |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[5] == "" and cells[7] == "", row  # step time, compile time
    assert cells[6] == "0.93x", row  # backward FLOPs vs Inductor


def test_accuracy_gap_to_the_mean_of_the_exact_runs(tmp_path):
    # two exact runs per seed (the control reseeds dropout): their mean is the reference
    summary = {
        "exact (inductor)": {"seeds": [0, 1], "accuracies": [0.80, 0.82], "mean": 0.81, "std": 0.0141},
        "exact (inductor) reseeded dropout": {"seeds": [0, 1], "accuracies": [0.78, 0.82], "mean": 0.80,
                                              "std": 0.028, "gap_to_exact": -0.01, "gap_std": 0.014},
        "wtacrs default": {"seeds": [0, 1], "accuracies": [0.79, 0.81], "mean": 0.80, "std": 0.0141,
                           "gap_to_exact": -0.01, "gap_std": 0.0},
    }
    (tmp_path / "accuracy_minilm.json").write_text(json.dumps({
        "benchmark": "accuracy_minilm", "command": "c", "machine": {"device": "cpu", "torch": "2.14.1"},
        "time": "t", "summary": summary, "runs": [],
        "task": {"train": 3000, "test": 1000, "max_len": 64, "batch": 32, "optimizer": "AdamW",
                 "epochs": 1, "accuracy_before_finetuning": 0.5},
    }))
    text = report.generate(tmp_path)
    assert "gap to the mean of the 2 exact runs of each seed" in text
    # per seed: 0.79 - 0.79 = 0, 0.81 - 0.82 = -0.01: mean -0.5 points, standard error 0.5
    assert "| wtacrs default | 80.00 +- 1.41 | 0, 1 | 79.0, 81.0 | -1.00 +- 0.00 | -0.50 +- 0.50 (n=2) |" in text
    assert "| exact (inductor) reseeded dropout | 80.00 +- 2.80 | 0, 1 | 78.0, 82.0 | -1.00 +- 1.40 | |" in text


def test_bootstrap_interval_of_the_median_ratio():
    mt = _bench_module("memory_time")
    import random

    rng = random.Random(1)
    # the machine's speed drifts from round to round; the configuration is 0.9x Inductor's step
    speed = [1 + 0.3 * rng.random() for _ in range(40)]
    ref = [s * (1 + 0.05 * rng.gauss(0, 1)) for s in speed]
    times = [0.9 * s * (1 + 0.05 * rng.gauss(0, 1)) for s in speed]
    lo, hi = mt.bootstrap_ci(times, ref)
    assert lo < 0.9 < hi and hi - lo < 0.15
    assert mt.bootstrap_ci(ref, ref) == [1.0, 1.0]


def test_write_block_replaces_only_the_generated_block(tmp_path):
    target = tmp_path / "results.md"
    target.write_text(f"# head\n\n{report.BEGIN}\nold table\n{report.END}\n\ntail\n")
    report.write_block("| new |", target)
    text = target.read_text()
    assert text.startswith("# head\n\n" + report.BEGIN)
    assert "old table" not in text and "| new |" in text
    assert text.endswith(report.END + "\n\ntail\n")
    bare = tmp_path / "bare.md"
    bare.write_text("no markers\n")
    with pytest.raises(SystemExit, match="no generated block"):
        report.write_block("x", bare)
