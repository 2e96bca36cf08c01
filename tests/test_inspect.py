"""``wtacrs_compile.inspect`` and the ``wtacrs-inspect`` command.

Golden files: ``tests/golden/inspect_*.txt`` hold the normalised text output of
``wtacrs-inspect`` on the bundled examples (see :func:`normalise`).  Byte counts and graphs are
deterministic for a given torch version, so any change shows up as a diff.  After an intended
change of the pass or of the output format, regenerate them and review ``git diff tests/golden``
like code::

    WTACRS_UPDATE_GOLDEN=1 python -m pytest tests/test_inspect.py -q

A golden file records the torch version it was made with; under another torch minor version
the comparison is skipped (graphs print differently across releases).

The HTML test screenshots the page in headless Chromium (``apt-get install chromium``) and is
skipped when it is absent.
"""

import contextlib
import importlib
import io
import json
import os
import pathlib
import re
import shutil
import subprocess
import types

import pytest
import torch
import torch.nn as nn

import wtacrs_compile
from wtacrs_compile import cli, examples

# By module path: the package's `backend` and `inspect` attributes are functions that shadow
# the submodules of the same name.
backend_module = importlib.import_module("wtacrs_compile.backend")
compiled_graphs_module = importlib.import_module("wtacrs_compile.compiled_graphs")
inspection_module = importlib.import_module("wtacrs_compile.inspection")

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("WTACRS_UPDATE_GOLDEN") == "1"
OP_FIELDS = {
    "module", "op", "shapes", "dtype", "ratio", "k", "decision", "reason",
    "saved_bytes_before", "saved_bytes_after",
}


# ------------------------------------------------------------------------------------------
# An independent measurement of saved-activation bytes, from the graphs Inductor compiled.


def capture_compiled_graphs(mp: pytest.MonkeyPatch, sink: list) -> None:
    """Record every (compile, graph_id, forward|backward, GraphModule) handed to Inductor's inner compile
    by the baseline (inspection.py) and by the wtacrs backend (backend.py): each one's
    compile_fx call gets an inner compile that notes the graph, then runs the recorder's."""
    for module, tag in ((inspection_module, "baseline"), (backend_module, "wtacrs")):

        def hooked(gm, inputs, record, on_graph=None, _tag=tag, **kw):
            inner = record.inner_compile(on_graph)

            def spy(graph_module, example_inputs, **ikw):
                kind = "backward" if ikw.get("is_backward") else "forward"
                sink.append((_tag, ikw.get("graph_id"), kind, graph_module))
                return inner(graph_module, example_inputs, **ikw)

            return compiled_graphs_module.compile_fx(gm, inputs, inner_compile=spy, **kw)

        mp.setattr(module, "recording_compile_fx", hooked)


def _aliases_its_input(node) -> bool:
    """Any op whose schema says its output aliases its first argument (views), not a list."""
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, torch._ops.OpOverload)
        and any(r.alias_info is not None and not r.alias_info.is_write for r in target._schema.returns)
    )


def saved_activation_bytes(fw: torch.fx.GraphModule, bw: torch.fx.GraphModule) -> int:
    """Bytes of the backward graph's inputs that are not tangents and not graph inputs of the
    forward (parameters, user inputs) or views of them.  Written apart from graph_utils."""
    saved = [n for n in bw.graph.find_nodes(op="placeholder") if not n.name.startswith("tangents")]
    # The forward returns (*outputs, *saved for backward) in the order backward takes them.
    fw_outputs = fw.graph.find_nodes(op="output")[0].args[0]
    sources = fw_outputs[len(fw_outputs) - len(saved):]
    total = 0
    for node, src in zip(saved, sources):
        while _aliases_its_input(src):
            src = src.args[0]
        if src.op == "placeholder":
            continue
        value = node.meta["val"]
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
    return total


def independent_totals(captured: list) -> dict:
    """Saved bytes per compile ("baseline", "wtacrs"), summed over its graphs.  Backward graphs
    come in reverse order of their forwards; compile_fx's graph_id pairs them."""
    totals = {"baseline": 0, "wtacrs": 0}
    forward = {}
    for tag, graph_id, kind, gm in captured:
        assert graph_id is not None
        if kind == "forward":
            forward[tag, graph_id] = gm
        else:
            totals[tag] += saved_activation_bytes(forward[tag, graph_id], gm)
    return totals


# ------------------------------------------------------------------------------------------
# Golden files


def normalise(text: str) -> str:
    """Drop what varies between runs and machines: ANSI colours, memory addresses, the paths of
    written files, trailing blanks."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", text)
    text = re.sub(r"0x[0-9a-fA-F]+", "0x?", text)
    lines = [l.rstrip() for l in text.splitlines() if not l.startswith("wrote ")]
    return "\n".join(lines).strip("\n") + "\n"


def _torch_minor() -> str:
    return ".".join(torch.__version__.split("+")[0].split(".")[:2])


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    header = f"# wtacrs-inspect golden output, torch {_torch_minor()}; regenerate: WTACRS_UPDATE_GOLDEN=1\n"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(header + normalise(text))
        return
    if not path.exists():
        pytest.fail(f"no golden file {path}; create it with WTACRS_UPDATE_GOLDEN=1")
    first, _, expected = path.read_text().partition("\n")
    made_with = re.search(r"torch (\d+\.\d+)", first)
    if made_with and made_with.group(1) != _torch_minor():
        pytest.skip(f"{path.name} was made with torch {made_with.group(1)}, this is {_torch_minor()}")
    assert normalise(text) == expected, (
        f"text output differs from {path}; if the change is intended, regenerate with "
        "WTACRS_UPDATE_GOLDEN=1 and review the diff"
    )


def run_cli(argv) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(list(argv)) == 0
    return out.getvalue()


# ------------------------------------------------------------------------------------------
# Python API


def test_inspect_api_fields_totals_and_no_side_effects(monkeypatch):
    model, inputs = examples.mlp()
    first = next(model.parameters())
    sentinel = torch.full_like(first, 7.0)
    first.grad = sentinel
    rng = torch.get_rng_state()
    captured = []
    capture_compiled_graphs(monkeypatch, captured)

    report = wtacrs_compile.inspect(model, inputs, ratio=0.3)

    d = json.loads(json.dumps(report.to_dict(graphs=True)))  # JSON-serialisable
    assert {"ops", "totals"} <= set(d)
    assert [op["module"] for op in d["ops"]] == ["0", "2"]  # definition order
    for op in d["ops"]:
        assert OP_FIELDS <= set(op), OP_FIELDS - set(op)
        assert op["shapes"]["x"][0] == 256 and op["k"] == 77 and op["dtype"] == "float32"
        assert op["decision"] in ("memory", "compute", "exact") and op["reason"]
    totals = d["totals"]
    measured = independent_totals(captured)
    assert totals["baseline_saved_bytes"] == measured["baseline"] > 0
    assert totals["wtacrs_saved_bytes"] == measured["wtacrs"]
    assert totals["ratio"] == pytest.approx(measured["wtacrs"] / measured["baseline"])
    assert d["graphs"][0]["graphs"]["backward_before"].startswith("graph(")
    # What the second linear's weight gradient reads from the compiled saved set: the full
    # ReLU output before; after, only its sample when the pass sampled it in forward.
    second = d["ops"][1]
    if second["compiled_reads_before"] is not None:  # the backend kept its compiled graphs
        assert second["compiled_reads_before"] == 256 * 256 * 4
        if second["decision"] == "memory":
            assert second["compiled_reads_after"] < 0.4 * second["compiled_reads_before"]

    # inspecting changed nothing the user owns
    assert first.grad is sentinel and all(p.grad is None for p in list(model.parameters())[1:])
    assert torch.equal(torch.get_rng_state(), rng)


def test_inspect_keyword_inputs_loss_and_graph_breaks(monkeypatch):
    """Two Dynamo graphs: ops and totals add up over both; dict inputs; `.loss` is the objective."""

    class TwoStage(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Linear(32, 128), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 32))

        def forward(self, x, target):
            h = self.stem(x)
            torch._dynamo.graph_break()
            return types.SimpleNamespace(loss=((self.head(h) - target) ** 2).mean())

    torch.manual_seed(0)
    model = TwoStage()
    captured = []
    capture_compiled_graphs(monkeypatch, captured)
    report = wtacrs_compile.inspect(model, {"x": torch.randn(128, 32), "target": torch.randn(128, 32)})

    assert report.objective == "loss"
    d = report.to_dict()
    assert len(d["graphs"]) == 2 and d["totals"]["graphs"] == 2
    assert [(op["graph"], op["module"]) for op in d["ops"]] == [(0, "stem.0"), (1, "head.0"), (1, "head.2")]
    measured = independent_totals(captured)
    assert d["totals"]["baseline_saved_bytes"] == measured["baseline"]
    assert d["totals"]["wtacrs_saved_bytes"] == measured["wtacrs"]
    assert d["totals"]["baseline_saved_bytes"] == sum(g["baseline_saved_bytes"] for g in d["graphs"])
    text = report.format()
    assert "2 graph(s)" in text and "graph 1: saved tensors" in text


def test_inspect_rejects_bad_arguments():
    model, inputs = examples.mlp()
    with pytest.raises(ValueError, match="unknown option 'ratioo'.*did you mean 'ratio'"):
        wtacrs_compile.inspect(model, inputs, ratioo=0.3)
    with pytest.raises(ValueError, match="ratio must be in"):
        wtacrs_compile.inspect(model, inputs, ratio=2.0)
    with pytest.raises(TypeError, match="tuple of positional inputs or a dict.*got list"):
        wtacrs_compile.inspect(model, list(inputs))
    with pytest.raises(TypeError, match="nn.Module"):
        wtacrs_compile.inspect(lambda x: x, inputs)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(inspection_module.InspectError, match="no backward pass to inspect"):
        wtacrs_compile.inspect(model, inputs)


# ------------------------------------------------------------------------------------------
# Command line


def test_cli_mlp_golden_with_diff():
    text = run_cli(["mlp", "--diff", "--color", "never"])
    assert "--- graph 0 backward (torch.compile)" in text and "+++ graph 0 backward (wtacrs)" in text
    check_golden("inspect_mlp", text)


@pytest.fixture(scope="module")
def bert_run(tmp_path_factory):
    """One ``wtacrs-inspect bert --json --html`` run with attention bmms opted in (the slow
    part), shared by the tests below."""
    pytest.importorskip("transformers")
    out_dir = tmp_path_factory.mktemp("inspect_bert")
    captured = []
    torch._dynamo.reset()
    with pytest.MonkeyPatch.context() as mp:
        capture_compiled_graphs(mp, captured)
        text = run_cli(["bert", "--options", '{"ops": ["linear", "bmm"]}',
                        "--json", str(out_dir / "bert.json"), "--html", str(out_dir / "bert.html")])
    return types.SimpleNamespace(
        text=text,
        json=json.loads((out_dir / "bert.json").read_text()),
        html=out_dir / "bert.html",
        measured=independent_totals(captured),
        dir=out_dir,
    )


def test_cli_bert_table_json_and_measured_totals(bert_run):
    d = bert_run.json
    ops = {op["module"]: op for op in d["ops"] if op["op"] == "linear"}
    assert len(ops) == 14  # 2 layers x (Q, K, V, attention output, FFN up, FFN down) + pooler + classifier
    # eager attention: Q K^T and P V, each with both operand gradients, per layer
    assert sum(op["op"] == "bmm" for op in d["ops"]) == 2 * 4
    for op in d["ops"]:
        assert OP_FIELDS <= set(op), OP_FIELDS - set(op)
    assert ops["bert.encoder.layer.0.output.dense"]["shapes"] == {"x": [256, 256], "grad": [256, 64]}
    assert ops["classifier"]["decision"] == "exact" and "output head" in ops["classifier"]["reason"]
    assert d["objective"] == "loss"
    totals = d["totals"]
    # the totals are the bytes the compiled backward graphs take as saved inputs
    assert totals["baseline_saved_bytes"] == bert_run.measured["baseline"]
    assert totals["wtacrs_saved_bytes"] == bert_run.measured["wtacrs"]
    assert totals["wtacrs_saved_bytes"] < totals["baseline_saved_bytes"]
    assert totals["ratio"] == pytest.approx(totals["wtacrs_saved_bytes"] / totals["baseline_saved_bytes"])
    # the table and the totals are printed
    text = bert_run.text
    assert "bert.encoder.layer.1.attention.self.query" in text and "bytes before -> after" in text
    assert f"torch.compile (Inductor)  {totals['baseline_saved_bytes']:,}" in text


def test_cli_bert_golden(bert_run):
    check_golden("inspect_bert", bert_run.text)


def test_html_is_self_contained_and_renders_in_headless_chromium(bert_run):
    page = bert_run.html.read_text()
    assert "<table>" in page and 'class="add"' in page and 'class="del"' in page
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page), "external asset in the page"
    chromium = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
    if chromium is None:
        pytest.skip("headless Chromium not installed (apt-get install chromium)")
    png = bert_run.dir / "bert.png"
    subprocess.run(
        [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run",
            f"--user-data-dir={bert_run.dir / 'chromium-profile'}", f"--screenshot={png}",
            "--window-size=1400,12000", bert_run.html.as_uri(),
        ],
        capture_output=True, timeout=120, check=False,
    )
    assert png.exists() and png.stat().st_size > 20_000, "no screenshot, or an empty page"
    Image = pytest.importorskip("PIL.Image")
    colours = Image.open(png).convert("RGB").getcolors(maxcolors=1 << 20)
    count = {rgb: n for n, rgb in colours}
    # Visible: the decision badges of the table, removed and added diff lines.
    assert count.get((0xD8, 0xF5, 0xDD), 0) > 500, "no 'memory' decision badge visible"
    assert count.get((0xFF, 0xEB, 0xE9), 0) > 2000, "no removed (red) diff line visible"
    assert count.get((0xE6, 0xFF, 0xEC), 0) > 2000, "no added (green) diff line visible"
    assert len(colours) > 50  # text is anti-aliased: a rendered page has many colours


@pytest.mark.parametrize(
    "argv, message",
    [
        (["no_such_example"], "unknown model 'no_such_example'"),
        (["no_such_module_xyz:make"], "cannot import module 'no_such_module_xyz'"),
        (["wtacrs_compile.examples:nope"], "has no attribute 'nope'"),
        (["wtacrs_compile.examples:EXAMPLES"], "not a function returning (model, example_inputs)"),
        (["torch:get_num_threads"], "must return a (model, example_inputs) pair, got int"),
        (["mlp", "--options", '{"ratioo": 0.3}'], "unknown option 'ratioo'"),
        (["mlp", "--ratio", "0"], "ratio must be in (0, 1]"),
        (["mlp", "--options", "[1]"], "--options must be a JSON object"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_factory_from_a_file_and_a_model_without_backward(tmp_path, capsys):
    (tmp_path / "my_models.py").write_text(
        "import torch\n"
        "def frozen():\n"
        "    m = torch.nn.Linear(8, 8).requires_grad_(False)\n"
        "    return m, (torch.randn(4, 8),)\n"
    )
    with pytest.raises(SystemExit) as exit_:
        cli.main([f"{tmp_path / 'my_models.py'}:frozen"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "my_models.py:frozen: the model's output has no `.loss`" in err and "Traceback" not in err


def test_console_script_is_installed():
    exe = shutil.which("wtacrs-inspect")
    if exe is None:
        pytest.skip("wtacrs-inspect not on PATH (pip install -e . installs it)")
    out = subprocess.run([exe, "--list"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert set(examples.EXAMPLES) <= {line.split()[0] for line in out.stdout.splitlines() if line.strip()}


def test_reports_of_a_dynamic_graph_render(tmp_path):
    """dynamic=True: symbolic N.  JSON, text and HTML hold traced sizes (ints) and bytes at the
    traced size; the reasons carry the symbolic expression."""
    model, inputs = examples.mlp()
    report = wtacrs_compile.inspect(model, inputs, ratio=0.3, dynamic=True)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["ops"] and all(op["decision"] == "compute" for op in d["ops"])
    for op in d["ops"]:
        assert op["shapes"]["x"][0] == 256 and op["k"] == 77, op
        assert op["saved_bytes_before"] == 256 * op["shapes"]["x"][1] * 4
        assert op["flops_after"] < op["flops_before"]
        assert "is symbolic" in op["reason"], op["reason"]
    assert d["totals"]["baseline_saved_bytes"] > 0 and d["totals"]["flops"]["wtacrs"]["backward"] > 0
    text = report.format()
    assert "77/256" in text and "is symbolic" in text
    html = report.to_html()
    assert html.startswith("<!DOCTYPE html>") and "77 / 256" in html and "backward matmul FLOPs" in html
    assert run_cli(["mlp", "--dynamic", "--json", str(tmp_path / "r.json")]).count("is symbolic") >= 1
