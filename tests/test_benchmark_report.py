"""The README results table is generated from the results files (benchmarks/report.py)."""

import importlib.util
import json
from pathlib import Path

spec = importlib.util.spec_from_file_location(
    "bench_report", Path(__file__).resolve().parent.parent / "benchmarks" / "report.py"
)
report = importlib.util.module_from_spec(spec)
spec.loader.exec_module(report)


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
