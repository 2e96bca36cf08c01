"""Plain-text rendering of an :class:`~wtacrs_compile.inspection.InspectReport`.

What ``wtacrs-inspect`` prints: the op table (one row per matched op; reasons are long and
repeat across a layer stack, so the table cites them as footnotes), the saved-activation
totals of both compiled backward graphs, the saved tensors that left or entered the saved
set, and on request the unified graph diffs.  Output is deterministic for a given model,
config and torch version (no timings, no addresses), which the golden-file tests rely on.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from .config import WTACRSConfig

_ALWAYS_SHOWN = ("ratio", "min_k", "deterministic", "sampling", "mode", "memory_budget")

_COLORS = {"+": "\033[32m", "-": "\033[31m", "@": "\033[36m"}
_RESET = "\033[0m"


LEGEND = (
    "X: the activation the weight gradient reads (N rows x D); G: its output gradient.",
    "bytes: the pass's account: X in full before -> the k sampled rows + indices + weights after.",
    "compiled reads: saved tensors of the compiled graphs the weight gradient computes X from,",
    "  torch.compile -> wtacrs; a tensor kept for other ops too (a LayerNorm or GeLU input X is",
    "  recomputed from) counts here as well, so these do not add up (names: --json).",
    "measured: saved bytes the op's class removed in the pass's partitioner trials.",
    "dW FLOPs: the weight-gradient matmul's, exact -> as rewritten (2 k D_in D_out when sampled).",
    "live_rows: exact over the k rows of G that can be non-zero (the rest are provably zero).",
)


def nbytes(n: Any) -> str:
    return "-" if n is None else f"{n:,}"


def si(n: Any) -> str:
    """A count in engineering units: 1.57M, 302k."""
    if n is None:
        return "-"
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def _arrow(before: Any, after: Any) -> str:
    return "-" if before is None and after is None else f"{nbytes(before)} -> {nbytes(after)}"


def shape(s: Sequence[int]) -> str:
    return "x".join(str(d) for d in s) if s else "-"


def describe_config(config: WTACRSConfig) -> str:
    """The main settings, then only the ones that differ from the defaults."""
    d, default = config.to_dict(), WTACRSConfig().to_dict()
    parts = [f"{k}={d[k]}" for k in _ALWAYS_SHOWN if k in d]
    parts += [f"{k}={v}" for k, v in d.items() if k not in _ALWAYS_SHOWN and v != default.get(k)]
    return " ".join(parts)


def _table(header: List[str], rows: List[List[str]], right: Sequence[int] = ()) -> List[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

    def fmt(r: List[str]) -> str:
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        return "  " + "  ".join(cells).rstrip()

    return [fmt(header)] + [fmt(r) for r in rows]


def _decision_summary(decisions: Dict[str, int]) -> str:
    order = ["memory", "compute", "live_rows", "exact"]
    keys = [k for k in order if k in decisions] + sorted(k for k in decisions if k not in order)
    return ", ".join(f"{decisions[k]} {k}" for k in keys)


def format_report(report: Any, diff: bool = False, joint: bool = False, color: bool = False) -> str:
    """The text report; ``diff`` adds the forward/backward graph diffs, ``joint`` the joint
    graph's, ``color`` ANSI colours on diff lines (for a terminal)."""
    totals = report.totals()
    ops = report.ops()
    multi = len(report.graphs) > 1
    out: List[str] = []
    what = "output.loss" if report.objective == "loss" else "the sum of the output"
    out.append(
        f"wtacrs inspect: {report.model}, {totals['graphs']} graph(s), "
        f"step: forward + backward of {what}"
    )
    out.append(f"config: {describe_config(report.config)}")
    out.append("")

    summary = _decision_summary(totals["decisions"])
    out.append(f"ops: {totals['ops']} matched" + (f" ({summary})" if summary else ""))
    if ops:
        notes: Dict[str, int] = {}
        rows = []
        for op in ops:
            note = notes.setdefault(op["reason"], len(notes) + 1) if op["reason"] else None
            measured = op.get("measured_saving")
            rows.append(
                ([str(op["graph"])] if multi else [])
                + [
                    op["module"] or "-",
                    op["op"],
                    shape(op["shapes"].get("x", [])),
                    shape(op["shapes"].get("grad", [])),
                    op["dtype"],
                    f"{op['k']}/{op['shapes'].get('x', [0])[0]}",
                    op["decision"],
                    f"{nbytes(op['saved_bytes_before'])} -> {nbytes(op['saved_bytes_after'])}"
                    + (" (shared)" if op.get("shared_draw_with") else ""),
                    _arrow(op.get("compiled_reads_before"), op.get("compiled_reads_after")),
                    nbytes(measured),
                    f"{si(op.get('flops_before'))} -> {si(op.get('flops_after'))}",
                    f"[{note}]" if note else "",
                ]
            )
        header = (["graph"] if multi else []) + [
            "module", "kind", "X", "G", "dtype", "k/N", "decision",
            "bytes before -> after", "compiled reads", "measured", "dW FLOPs", "reason",
        ]
        shift = 1 if multi else 0
        out += _table(header, rows, right=(5 + shift, 9 + shift))
        out.append("")
        out.extend("  " + line for line in LEGEND)
        for reason, i in notes.items():
            out.append(f"  [{i}] {reason}")
        for op in ops:
            if op.get("shared_draw_with"):
                source = op.get("shared_draw_with_module") or op["shared_draw_with"]
                out.append(f"  shared: {op['module']} reuses the rows drawn for {source} (same activation)")
    out.append("")

    base, after = totals["baseline_saved_bytes"], totals["wtacrs_saved_bytes"]
    exact, planned = totals["planned_baseline_saved_bytes"], totals["planned_wtacrs_saved_bytes"]
    width = max(len(nbytes(base)), len(nbytes(after)))
    out.append("saved activations (inputs of the compiled backward graphs, bytes):")
    out.append(f"  torch.compile (Inductor)  {nbytes(base):>{width}}")
    if exact is not None and exact != base and base:
        # the pass's exact partition: recomputation under the compile's memory budget and
        # the exact live-rows rewrite, no sampling
        out.append(f"  exact, no sampling        {nbytes(exact):>{width}}  {exact / base:.3f}x  (memory budget, live rows)")
    line = f"  wtacrs                    {nbytes(after):>{width}}"
    if totals["ratio"] is not None:
        pct = 100.0 * (after - base) / base
        line += f"  {totals['ratio']:.3f}x  ({after - base:+,} B, {pct:+.1f}%)"
    out.append(line)
    if planned is not None and planned != after:
        out.append(f"  note: the pass's partition of the rewritten graph measured {nbytes(planned)}; "
                   "the compiled graphs differ from it")
    out.append("")

    flops = totals["flops"]
    if any(v is not None for side in flops.values() for v in side.values()):
        out.append("FLOPs of matmul-class ops (compiled graphs, torch.utils.flop_counter formulas):")
        rows = []
        for side, label in (("torch.compile", "torch.compile (Inductor)"), ("wtacrs", "wtacrs")):
            f = flops[side]
            rows.append([label, nbytes(f["forward"]), nbytes(f["backward"])])
        base_bw, after_bw = flops["torch.compile"]["backward"], flops["wtacrs"]["backward"]
        rows[0].append("")
        rows[1].append(f"{after_bw / base_bw:.3f}x backward" if base_bw and after_bw is not None else "")
        out += _table(["", "forward", "backward", ""], rows, right=(1, 2))
        out.append("")

    for g in report.graphs:
        removed, added = g.saved_tensor_changes()
        packed = list(getattr(g.report, "packed_masks", []) or [])
        prefix = f"graph {g.index}: " if multi else ""
        out.append(
            f"{prefix}saved tensors: {len(removed)} removed ({nbytes(sum(t.bytes for t in removed))} B), "
            f"{len(added)} added ({nbytes(sum(t.bytes for t in added))} B)"
        )
        rows = []
        for sign, tensors in (("-", removed), ("+", added)):
            for t in sorted(tensors, key=lambda t: (-t.bytes, t.name)):
                kind = f"{t.dtype}[{', '.join(map(str, t.shape))}]" if t.shape is not None else ""
                rows.append([sign, t.name, kind, nbytes(t.bytes), t.module])
        if rows:
            out += _table(["", "name", "tensor", "bytes", "module"], rows, right=(3,))
        if packed:
            out.append(f"  boolean masks stored as packed bits: {', '.join(packed)}")
        draws = dict(getattr(g.report, "uniform_draws", {}) or {})
        if draws.get("hashed") or len(draws) > 2:
            hashed, elements = draws.pop("hashed", 0), draws.pop("elements", 0)
            left = "".join(f"; left to Inductor's Philox: {n} ({why})" for why, n in sorted(draws.items()))
            out.append(f"  uniform draws (dropout masks) hashed: {hashed} ({elements:,} elements){left}")
        note = getattr(g.report, "partitioner_note", "")
        if note:  # recomputation bans lifted, a budget tightened (passes/meet_budget.py)
            out.append(f"  partitioner: {note}")
    out.append("")

    if diff or joint:
        kinds = (["forward", "backward"] if diff else []) + (["joint"] if joint else [])
        text = report.diff(kinds)
        if color:
            text = "\n".join(_colorize(l) for l in text.splitlines()) + "\n"
        out.append(text.rstrip("\n"))
        out.append("")
    return "\n".join(out)


def _colorize(line: str) -> str:
    if line.startswith(("+++", "---")):
        return f"\033[1m{line}{_RESET}"
    c = _COLORS.get(line[:1])
    return f"{c}{line}{_RESET}" if c else line
