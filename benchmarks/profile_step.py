"""Where one training step's time goes, per kind of op, Inductor against wtacrs configurations.

    python benchmarks/profile_step.py --model minilm --batch 32 --seq 64   # -> results/profile-minilm.{json,md}

Each configuration is compiled and warmed up, then profiled (torch.profiler, CPU activity, with
Inductor's per-kernel records: ``torch._inductor.config.cpp.enable_kernel_profile``) over
``--steps`` steps, in ``--rounds`` interleaved rounds; the figures are per step, from the last
round.  Self time is grouped by kind:

- ``matmul``: ``aten::mm`` / ``addmm`` / ``bmm`` (the extern kernels Inductor calls);
- ``draw``: the draws Inductor does not generate code for: ``wtacrs::draw`` (top-k to
  indices and weights, with every ATen call inside it) and the noise (``wtacrs::uniform``,
  ``rand_like``);
- ``rng kernels``: generated kernels that draw dropout masks (``native_dropout`` in the name,
  not its backward): Inductor's per-element random numbers;
- ``other kernels``: every other generated kernel;
- ``other aten``: the remaining ATen calls (copies, ...).

The profiled sum is the time the profiler attributes to these records; the step time (median
of the same rounds, unprofiled) is the figure to compare with ``memory_time.py``.
The markdown file holds the table and, per kernel name (summed over layers), the 12 largest
differences against the first configuration; ``--render results/profile-minilm.json`` redraws it.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import common  # noqa: E402

DRAW_OPS = ("wtacrs::draw", "wtacrs::uniform", "aten::rand_like")
MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm")
KINDS = ("matmul", "draw", "rng kernels", "other kernels", "other aten")

def _configs():
    """The memory_time configurations this profile compares (common.configurations), and the
    first one again with its boolean masks packed (pack_masks=True, opt-in)."""
    by_name = {c["name"]: c for c in common.configurations(modes=False)}
    names = ("inductor", "wtacrs compute budget=1.0", "inductor budget=0.1", "wtacrs default")
    out = {name: by_name[name] for name in names}
    packed = "wtacrs compute budget=1.0 packed masks"
    out[packed] = dict(by_name["wtacrs compute budget=1.0"], name=packed, pack_masks=True)
    return out


CONFIGS = _configs()


def kernel_name(key: str) -> str:
    """A generated kernel's name without the graph number and the kernel index."""
    return re.sub(r"_\d+$", "", re.sub(r"^graph_\d+_cpp_fused_", "", key))


def kind_of(key: str) -> str:
    if key in MATMUL_OPS:
        return "matmul"
    if key in DRAW_OPS:
        return "draw"
    if key.startswith("graph_"):
        name = kernel_name(key)
        return "rng kernels" if "native_dropout" in name.replace("native_dropout_backward", "") else "other kernels"
    return "other aten"


def profile_steps(step, steps: int) -> collections.Counter:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    per_key: collections.Counter = collections.Counter()
    for event in prof.events():
        key = event.name
        if key in DRAW_OPS:  # a draw op with everything it calls
            if not _inside_draw(event):
                per_key[key] += event.cpu_time_total / steps / 1e3  # ms per step
        elif key.startswith(("graph_", "aten::")) and not _inside_draw(event):
            per_key[key] += event.self_cpu_time_total / steps / 1e3
    return per_key


def _inside_draw(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in DRAW_OPS:
            return True
        parent = parent.cpu_parent
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=common.MODELS, default="minilm")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int)
    p.add_argument("--steps", type=int, default=3, help="profiled steps per round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--out", help="results file stem (default results/profile-<model>)")
    p.add_argument("--render", metavar="JSON", help="only rewrite the markdown table of an existing results file")
    args = p.parse_args()
    if args.render:
        path = Path(args.render)
        path.with_suffix(".md").write_text(markdown(json.loads(path.read_text())))
        return

    torch._inductor.config.cpp.enable_kernel_profile = True
    common.raise_recompile_limits()
    model, data, desc = common.build_model(args.model, args.batch, args.seq, args.layers)

    steps = {}
    for name in args.configs:
        fn, _ = common.compile_config(model, CONFIGS[name])

        def step(fn=fn):
            model.zero_grad(set_to_none=True)
            fn(**data).backward()

        for _ in range(2):
            step()
        steps[name] = step

    times = {name: [] for name in steps}
    profiles = {}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
            profiles[name] = profile_steps(step, args.steps)

    rows = []
    for name in steps:
        per_kind = collections.Counter()
        for key, ms in profiles[name].items():
            per_kind[kind_of(key)] += ms
        rows.append({
            "name": name,
            "step_ms": statistics.median(times[name]) * 1e3,
            "profiled_ms": sum(per_kind.values()),
            "per_kind_ms": {k: per_kind[k] for k in KINDS},
            "per_key_ms": dict(profiles[name]),
        })
    stem = Path(args.out) if args.out else common.RESULTS / f"profile-{args.model}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/profile_step.py " + " ".join(sys.argv[1:])
    result = {"benchmark": "profile_step", "command": command, "machine": common.machine(), "model": desc,
              "settings": {"batch": args.batch, "seq": args.seq, "steps": args.steps, "rounds": args.rounds},
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": rows}
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1))
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


def markdown(result) -> str:
    rows = result["results"]
    base = rows[0]
    lines = [f"Command: `{result['command']}`  ", f"Model: {result['model']}, batch {result['settings']['batch']} x "
             f"{result['settings']['seq']}; {result['machine']['cpu']} ({result['machine']['torch_threads']} threads), "
             f"torch {result['machine']['torch']}, commit {result['machine']['git_commit']}.", "",
             "Milliseconds per step (profiler self time; step time unprofiled, median of the rounds):", "",
             "| configuration | step | profiled | " + " | ".join(KINDS) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in KINDS) + " |"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['step_ms']:.0f} | {r['profiled_ms']:.0f} | "
                     + " | ".join(f"{r['per_kind_ms'][k]:.0f}" for k in KINDS) + " |")
    base_kernels = by_kernel(base["per_key_ms"])
    for r in rows[1:]:
        kernels = by_kernel(r["per_key_ms"])
        keys = set(kernels) | set(base_kernels)
        diff = sorted(keys, key=lambda k: -abs(kernels.get(k, (0, 0))[0] - base_kernels.get(k, (0, 0))[0]))[:12]
        lines += ["", f"Largest differences per kernel (summed over the layers; in brackets, how many distinct kernels share the name), "
                  f"{r['name']} against {base['name']}, ms per step:", "",
                  f"| kernel or op | {base['name']} | {r['name']} |", "| --- | ---: | ---: |"]
        for k in diff:
            (a, na), (b, nb) = base_kernels.get(k, (0, 0)), kernels.get(k, (0, 0))
            lines.append(f"| `{k[:100]}` | {a:.1f} ({na}) | {b:.1f} ({nb}) |")
    return "\n".join(lines) + "\n"


def by_kernel(per_key):
    """Per-step ms and number of distinct kernels, keyed by the kernel's name without the
    graph and kernel numbers (the same fused kernel in every layer counts once)."""
    out = {}
    for key, ms in per_key.items():
        name = kernel_name(key) if key.startswith("graph_") else key
        total, count = out.get(name, (0.0, 0))
        out[name] = (total + ms, count + 1)
    return out


if __name__ == "__main__":
    main()
