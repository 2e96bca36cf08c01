"""A self-contained HTML page for an :class:`~wtacrs_compile.inspection.InspectReport`.

One file, inline CSS, no script and no external asset: it can be attached to an issue or
opened from a CI artifact offline.  It shows the totals, the op table (full reasons, and a bar
of the bytes an op keeps after the rewrite against before), the unified diffs of the compiled
forward and backward graphs (removed lines red, added green), and the saved tensors that left
or entered the saved set.
"""

from __future__ import annotations

import html
from typing import Any, List

from .text_report import LEGEND, describe_config, nbytes, shape, si

_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d1d1f; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 8px; }
.meta { color: #555; margin: 2px 0; } code, pre { font: 12px/1.4 ui-monospace, Menlo, Consolas, monospace; }
.cards { display: flex; gap: 12px; margin: 14px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px 14px; min-width: 180px; }
.card .v { font-size: 20px; font-weight: 600; } .card .l { color: #666; font-size: 12px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid #e4e4e4; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f5f5f7; position: sticky; top: 0; } td.n { text-align: right; white-space: nowrap; }
td.reason { color: #444; font-size: 12px; line-height: 1.3; overflow-wrap: anywhere; }
.d { border-radius: 4px; padding: 1px 6px; font-weight: 600; font-size: 12px; }
.d-memory { background: #d8f5dd; color: #11602a; } .d-compute { background: #dde8ff; color: #1f3f8f; }
.d-exact { background: #eee; color: #555; } .d-live_rows { background: #f3ecd8; color: #6a4f0b; }
.bar { background: #eee; height: 6px; width: 120px; border-radius: 3px; margin-top: 3px; }
.bar > div { background: #3a9d5d; height: 6px; border-radius: 3px; }
details { margin: 8px 0; } summary { cursor: pointer; font-weight: 600; }
pre.diff { border: 1px solid #ddd; border-radius: 6px; padding: 6px 0; overflow-x: auto; margin: 6px 0; }
pre.diff span { display: block; padding: 0 10px; white-space: pre; }
.add { background: #e6ffec; color: #116329; } .del { background: #ffebe9; color: #82071e; }
.hunk { background: #ddf4ff; color: #0550ae; } .file { color: #555; font-weight: 600; }
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _diff_block(text: str) -> str:
    spans = []
    for line in text.splitlines():
        if line.startswith(("+++", "---")):
            cls = "file"
        elif line.startswith("+"):
            cls = "add"
        elif line.startswith("-"):
            cls = "del"
        elif line.startswith("@@"):
            cls = "hunk"
        else:
            cls = ""
        spans.append(f'<span class="{cls}">{_e(line) or " "}</span>' if cls else f"<span>{_e(line) or ' '}</span>")
    return '<pre class="diff">' + "".join(spans) + "</pre>"


def render_html(report: Any, joint: bool = False) -> str:
    totals = report.totals()
    ops = report.ops()
    multi = len(report.graphs) > 1
    what = "output.loss" if report.objective == "loss" else "the sum of the output"
    parts: List[str] = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>wtacrs inspect: {_e(report.model)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>wtacrs inspect: {_e(report.model)}</h1>",
        f'<p class="meta">{totals["graphs"]} graph(s); step: forward + backward of {_e(what)}</p>',
        f'<p class="meta">config: <code>{_e(describe_config(report.config))}</code></p>',
    ]

    base, after = totals["baseline_saved_bytes"], totals["wtacrs_saved_bytes"]
    ratio = totals["ratio"]
    decisions = ", ".join(f"{v} {k}" for k, v in totals["decisions"].items()) or "none"
    parts.append('<div class="cards">')
    for value, label in (
        (f"{nbytes(base)} B", "saved activations, torch.compile (Inductor)"),
        (f"{nbytes(after)} B", "saved activations, wtacrs"),
        (f"{ratio:.3f}x" if ratio is not None else "-", f"ratio ({after - base:+,} B)"),
        (str(totals["ops"]), f"matched ops: {decisions}"),
    ) + _flops_card(totals["flops"]):
        parts.append(f'<div class="card"><div class="v">{_e(value)}</div><div class="l">{_e(label)}</div></div>')
    parts.append("</div>")
    parts.append(
        '<p class="meta">Totals are read off the backward graphs Inductor compiled: their inputs '
        "that are not tangents, parameters or views of graph inputs.</p>"
    )

    parts.append("<h2>Ops</h2><table><thead><tr>")
    header = (["graph"] if multi else []) + [
        "module", "kind", "X (N x D)", "G", "dtype", "k / N", "decision",
        "bytes before &rarr; after", "compiled reads", "measured", "dW FLOPs", "reason",
    ]
    parts.append("".join(f"<th>{h}</th>" for h in header) + "</tr></thead><tbody>")
    for op in ops:
        before, kept = op["saved_bytes_before"] or 0, op["saved_bytes_after"] or 0
        width = 100.0 * kept / before if before else 0.0
        cells = ([f'<td class="n">{op["graph"]}</td>'] if multi else []) + [
            f"<td title=\"{_e(op.get('module_type', ''))}\"><code>{_e(op['module'] or '-')}</code></td>",
            f"<td>{_e(op['op'])}</td>",
            f"<td>{_e(shape(op['shapes'].get('x', [])))}</td>",
            f"<td>{_e(shape(op['shapes'].get('grad', [])))}</td>",
            f"<td>{_e(op['dtype'])}</td>",
            f'<td class="n">{op["k"]} / {op["shapes"].get("x", [0])[0]}</td>',
            f'<td><span class="d d-{_e(op["decision"])}">{_e(op["decision"])}</span></td>',
            f'<td class="n">{nbytes(op["saved_bytes_before"])} &rarr; {nbytes(op["saved_bytes_after"])}'
            f'<div class="bar"><div style="width:{min(width, 100.0):.1f}%"></div></div></td>',
            f'<td class="n" title="{_e(_reads(op))}">{nbytes(op.get("compiled_reads_before"))} &rarr; '
            f'{nbytes(op.get("compiled_reads_after"))}</td>',
            f'<td class="n">{nbytes(op.get("measured_saving"))}</td>',
            f'<td class="n">{si(op.get("flops_before"))} &rarr; {si(op.get("flops_after"))}</td>',
            f'<td class="reason">{_e(op["reason"])}{_shared(op)}</td>',
        ]
        parts.append("<tr>" + "".join(cells) + "</tr>")
    if not ops:
        parts.append(f'<tr><td colspan="{len(header)}">no weight-gradient matmul matched</td></tr>')
    parts.append("</tbody></table>")
    parts.append('<p class="meta">' + "<br>".join(_e(l) for l in LEGEND) + " (bar: bytes after / before)</p>")

    parts.append("<h2>Graph diffs: torch.compile (&minus;) vs wtacrs (+)</h2>")
    kinds = ["forward", "backward"] + (["joint"] if joint else [])
    for g in report.graphs:
        for kind in kinds:
            text = g.diff(kind)
            changed = sum(1 for l in text.splitlines() if l[:1] in "+-" and not l.startswith(("+++", "---")))
            parts.append(
                f"<details open><summary>graph {g.index} {kind}: {changed} line(s) changed</summary>"
                f"{_diff_block(text)}</details>"
            )

    parts.append("<h2>Saved tensors</h2>")
    for g in report.graphs:
        removed, added = g.saved_tensor_changes()
        parts.append(
            f"<details><summary>graph {g.index}: {len(removed)} removed "
            f"({nbytes(sum(t.bytes for t in removed))} B), {len(added)} added "
            f"({nbytes(sum(t.bytes for t in added))} B)</summary><table><thead><tr>"
            "<th></th><th>name</th><th>tensor</th><th>bytes</th><th>module</th></tr></thead><tbody>"
        )
        for sign, cls, tensors in (("&minus;", "del", removed), ("+", "add", added)):
            for t in sorted(tensors, key=lambda t: (-t.bytes, t.name)):
                kind = f"{t.dtype}[{', '.join(map(str, t.shape))}]" if t.shape is not None else ""
                parts.append(
                    f'<tr class="{cls}"><td>{sign}</td><td><code>{_e(t.name)}</code></td><td>{_e(kind)}</td>'
                    f'<td class="n">{nbytes(t.bytes)}</td><td><code>{_e(t.module)}</code></td></tr>'
                )
        parts.append("</tbody></table></details>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"



def _flops_card(flops: dict) -> tuple:
    """The backward's matmul FLOPs, wtacrs against torch.compile, as one more card."""
    before, after = flops["torch.compile"]["backward"], flops["wtacrs"]["backward"]
    if not before or after is None:
        return ()
    return ((f"{after / before:.3f}x", f"backward matmul FLOPs ({si(before)} -> {si(after)})"),)


def _shared(op: dict) -> str:
    if not op.get("shared_draw_with"):
        return ""
    source = op.get("shared_draw_with_module") or op["shared_draw_with"]
    return f"<br><i>reuses the rows drawn for <code>{_e(source)}</code></i>"


def _reads(op: dict) -> str:
    reads = op.get("compiled_reads")
    if not reads:
        return ""
    return "; ".join(
        f"{side}: " + (", ".join(f"{n} ({b:,} B)" for n, b in reads[side].items()) or "nothing")
        for side in ("before", "after")
    )
