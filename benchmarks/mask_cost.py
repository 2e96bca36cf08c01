"""What drawing dropout masks again in backward costs a configuration, per training step.

    python benchmarks/mask_cost.py --model minilm --batch 32 --seq 64   # -> results/mask_cost-minilm.{json,png}

Under a memory budget the partitioner does not save dropout's keep-masks: backward draws each
mask again from its saved seed (``inductor_random``, Philox per element on the CPU).  Plain
Inductor saves most masks as ``torch.bool`` instead.  This script compiles each configuration
(one step), counts the random elements each compiled graph draws (``prims.inductor_random``
nodes, by their fake values' sizes), and times, on the model's largest mask shape, what one
element costs to:

- ``redraw``: draw again and apply, ``g * (rand_like(g) > p) / (1 - p)`` (a backward that
  recomputes the mask);
- ``bool``: apply a saved boolean mask, ``g * m / (1 - p)``;
- ``bits``: apply a mask saved as bit planes (``passes/pack_masks.unpack_bits``);
- ``pack``: draw a mask and pack it into bit planes (what forward would add to save bits).

``bool`` is what plain Inductor's backward pays per saved mask.  The second estimate is what
saving the masks as bits would recover: forward draws and packs each mask and applies the
unpacked copy, backward applies the bits, against drawing in both (``2 redraw - pack - 2
bits`` per element; ``passes/pack_masks.py``).

each a ``torch.compile``'d function, median of ``--calls`` calls, the four interleaved.  The
estimate per configuration is its backward's random elements times the ``redraw`` cost: the
step time spent drawing masks again, to set beside the configurations' step times from
``memory_time.py`` (same model, batch and threads).
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
from wtacrs_compile.passes.pack_masks import pack_bits, unpack_bits  # noqa: E402

CONFIGS = {
    "inductor": {"name": "inductor", "kind": "inductor"},
    "inductor budget=0.1": {"name": "inductor budget=0.1", "kind": "inductor", "budget": 0.1},
    "wtacrs default": {"name": "wtacrs default", "kind": "wtacrs"},
}
_RANDOM = torch.ops.prims.inductor_random.default


def random_shapes(gm: torch.fx.GraphModule) -> list:
    """The shapes of the random tensors a compiled graph draws (its ``inductor_random`` calls)."""
    return [tuple(n.meta["val"].shape) for n in gm.graph.nodes if n.op == "call_function" and n.target is _RANDOM]


def random_elements(shapes: list) -> dict:
    """How many draws and random elements :func:`random_shapes` found."""
    sizes = [torch.Size(s).numel() for s in shapes]
    return {"draws": len(sizes), "elements": int(sum(sizes)), "largest": max(sizes, default=0)}


def graph_modules(rec: common.Recorder) -> dict:
    if rec.wtacrs is not None:
        return rec.wtacrs.reports[-1].graph_modules
    return rec.graphs[-1].modules


def per_element_costs(shape, p: float, calls: int) -> dict:
    """Nanoseconds per element of each way of getting a mask to backward (module docstring)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(shape, generator=gen)
    m = torch.rand(shape, generator=gen) > p
    packed = pack_bits(m)
    scale = 1.0 / (1.0 - p)
    fns = {
        "redraw": (torch.compile(lambda g: g * (torch.rand_like(g) > p) * scale), (g,)),
        "bool": (torch.compile(lambda g, m: g * m * scale), (g, m)),
        "bits": (torch.compile(lambda g, b: g * unpack_bits(b, shape) * scale), (g, packed)),
        "pack": (torch.compile(lambda g: pack_bits(torch.rand_like(g) > p)), (g,)),
    }
    times = {k: [] for k in fns}
    for fn, args in fns.values():
        for _ in range(3):
            fn(*args)
    for _ in range(calls):  # interleaved: the host's drift falls on all four alike
        for k, (fn, args) in fns.items():
            t = time.perf_counter()
            fn(*args)
            times[k].append(time.perf_counter() - t)
    n = g.numel()
    return {k: statistics.median(v) / n * 1e9 for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", choices=common.MODELS)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--dropout", type=float, default=0.1, help="drop probability of the timed masks")
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    common.raise_recompile_limits()
    out = Path(args.out or common.RESULTS / f"mask_cost-{args.model}.json")

    counts, shapes, desc = {}, [], ""
    for name, cfg in CONFIGS.items():
        torch._dynamo.reset()
        model, data, desc = common.build_model(args.model, args.batch, args.seq, args.layers)
        fn, rec = common.compile_config(model, cfg)
        fn(**data).backward()
        mods = graph_modules(rec)
        drawn = {kind: random_shapes(mods[kind]) for kind in ("forward", "backward")}
        counts[name] = {kind: random_elements(s) for kind, s in drawn.items()}
        shapes += drawn["forward"]
    largest = max(shapes, key=lambda s: torch.Size(s).numel())
    costs = per_element_costs(largest, args.dropout, args.calls)
    # saving those masks as bits instead: forward draws and packs each (pack) and applies the
    # unpacked copy (bits) where it applied a fresh draw (redraw), backward applies the bits
    # (bits) where it drew again (redraw)
    bits_saving = 2 * costs["redraw"] - costs["pack"] - 2 * costs["bits"]
    for c in counts.values():
        c["backward_redraw_ms_estimate"] = c["backward"]["elements"] * costs["redraw"] / 1e6
        c["as_bits_saving_ms_estimate"] = c["backward"]["elements"] * bits_saving / 1e6

    result = {
        "benchmark": "mask_cost",
        "command": " ".join(["python", "benchmarks/mask_cost.py", *sys.argv[1:]]),
        "machine": common.machine(),
        "model": desc,
        "batch": args.batch,
        "seq": args.seq,
        "timed_shape": list(largest),
        "ns_per_element": costs,
        "configs": counts,
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ns per element on {list(largest)}: " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    for name, c in counts.items():
        print(f"  {name:22s} forward draws {c['forward']['elements'] / 1e6:6.2f} M, backward draws again "
              f"{c['backward']['elements'] / 1e6:6.2f} M: ~{c['backward_redraw_ms_estimate']:5.1f} ms per step "
              f"(saved as bits instead: ~{c['as_bits_saving_ms_estimate']:5.1f} ms less)")
    plot(result, out.with_suffix(".png"))
    print(f"wrote {out} and {out.with_suffix('.png').name}")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["configs"])
    redraw = [result["configs"][n]["backward_redraw_ms_estimate"] for n in names]
    bits = [result["configs"][n]["as_bits_saving_ms_estimate"] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], redraw, width=0.4, label="estimated cost of the masks drawn again in backward")
    ax.bar([i + 0.2 for i in x], bits, width=0.4, label="estimated saving if kept as bits (from the per-element costs)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("ms per step (estimate)")
    ax.set_title(f"{result['model'].split(' (')[0]}, batch {result['batch']} x {result['seq']}: dropout masks", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
