"""Compile time of backend="wtacrs" against Inductor, whole model and regional, fresh caches.

    python benchmarks/compile_time.py --model bert-base          # -> results/compile_time-bert-base.json

Four runs, each in a fresh subprocess with an empty Inductor cache directory
(TORCHINDUCTOR_CACHE_DIR) so that nothing compiled earlier is reused:

- style ``whole``: ``torch.compile(model, backend=...)``;
- style ``regional``: every repeated block compiled in place with one backend object
  (``for layer in model.bert.encoder.layer: layer.compile(backend=backend)``); embeddings and
  head run eagerly;

each with Inductor, with the wtacrs defaults and, with ``--backends`` naming it, with Inductor
under the default's ``memory_budget`` as ``activation_memory_budget`` (``inductor-budget``:
the exact recomputation the default asks for, without sampling; it tells which part of wtacrs's
extra compile time is the budget's).  compile_s = the first three training steps
less three steady ones (median of steps 4-6), as the second step may recompile (for both
backends).  For wtacrs the reports' compile_seconds are summed per stage over the graphs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402

STYLES = ("whole", "regional")
BACKENDS = ("inductor", "inductor-budget", "wtacrs")


def blocks(wrapped, model_name: str):
    m = wrapped.model
    if model_name in ("bert-base", "minilm"):
        return list(m.bert.encoder.layer)
    if model_name == "t5-base":
        return list(m.encoder.block) + list(m.decoder.block)
    if model_name == "vit-b16":
        return list(m.blocks)
    raise SystemExit(f"no block list for {model_name}")


def run_one(args) -> dict:
    import torch

    common.raise_recompile_limits()
    batch, seq = common.DEFAULT_SHAPES[args.model]
    model, data, desc = common.build_model(args.model, args.batch or batch, args.seq or seq, args.layers)
    backend = None
    if args.backend == "wtacrs":
        import wtacrs_compile

        backend = wtacrs_compile.backend()
    target = backend if backend is not None else "inductor"
    if args.backend == "inductor-budget":  # the default's memory_budget, read at each compile
        from wtacrs_compile import WTACRSConfig

        torch._functorch.config.activation_memory_budget = WTACRSConfig().memory_budget
    if args.style == "whole":
        fn = torch.compile(model, backend=target)
    else:
        for block in blocks(model, args.model):
            block.compile(backend=target)
        fn = model
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        fn(**data).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    steady = statistics.median(times[3:])
    out = {"style": args.style, "backend": args.backend, "model": desc,
           "compile_s": sum(times[:3]) - 3 * steady, "step_s": steady, "first_steps_s": times[:3]}
    if backend is not None:
        stages: dict = {}
        for r in backend.reports:
            for key, v in r.compile_seconds.items():
                stages[key] = stages.get(key, 0.0) + v
        out["wtacrs_compile_seconds"] = stages
        out["graphs"] = len(backend.reports)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=common.MODELS, required=True)
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--layers", type=int, help="fewer layers than the real shape (said so in the output)")
    p.add_argument("--styles", nargs="+", default=list(STYLES), choices=STYLES)
    p.add_argument("--backends", nargs="+", default=["inductor", "wtacrs"], choices=BACKENDS)
    p.add_argument("--out", help="results file (default results/compile_time-<model>.json)")
    p.add_argument("--style", help=argparse.SUPPRESS)  # subprocess mode
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.style:
        print("RESULT " + json.dumps(run_one(args)), flush=True)
        return

    rows = []
    for style in args.styles:
        for backend in args.backends:
            with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
                env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
                cmd = [sys.executable, __file__, "--model", args.model, "--style", style, "--backend", backend]
                for key in ("batch", "seq", "layers"):
                    if getattr(args, key):
                        cmd += [f"--{key}", str(getattr(args, key))]
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                rows.append({"style": style, "backend": backend, "status": "failed", "error": proc.stderr[-3000:]})
                print(f"  {style:<8} {backend:<15} FAILED", flush=True)
                continue
            row = json.loads(lines[-1][len("RESULT "):])
            rows.append(row)
            print(f"  {style:<8} {backend:<15} compile {row['compile_s']:7.1f} s  step {row['step_s']:6.2f} s", flush=True)
    for style in args.styles:
        by = {r["backend"]: r for r in rows if r["style"] == style and "compile_s" in r}
        for name in ("inductor-budget", "wtacrs"):
            if "inductor" in by and name in by:
                by[name]["compile_ratio_vs_inductor"] = by[name]["compile_s"] / by["inductor"]["compile_s"]
                print(f"{style}: {name} compile {by[name]['compile_ratio_vs_inductor']:.2f}x Inductor's", flush=True)
    out = Path(args.out) if args.out else common.RESULTS / f"compile_time-{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "compile_time", "command": "python benchmarks/compile_time.py " + " ".join(sys.argv[1:]),
        "machine": common.machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows,
    }, indent=1))
    print(out)


if __name__ == "__main__":
    main()
