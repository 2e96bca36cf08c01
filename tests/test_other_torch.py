"""The backend under another torch than the suite's (the GPU machines carry torch 2.11): a
training step of the default plan and of forward draws, in a subprocess of the interpreter
named by ``WTACRS_OTHER_TORCH_PYTHON`` (a virtual environment with that torch and this
package's dependencies).  Skipped, saying so, when the variable is not set.

    python -m venv --system-site-packages /tmp/v211
    /tmp/v211/bin/pip install --no-deps torch==2.11.0
    WTACRS_OTHER_TORCH_PYTHON=/tmp/v211/bin/python python -m pytest tests/test_other_torch.py
"""

import json
import os
import pathlib
import subprocess
import textwrap

import pytest

PYTHON = os.environ.get("WTACRS_OTHER_TORCH_PYTHON")
ROOT = pathlib.Path(__file__).resolve().parent.parent

SCRIPT = textwrap.dedent(
    """
    import json, torch, torch.nn as nn
    import wtacrs_compile
    out = {"torch": torch.__version__}
    for mode in ("compute", "memory", "all"):
        torch._dynamo.reset()
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 64))
        b = wtacrs_compile.backend(mode=mode, ratio=0.3)
        c = torch.compile(m, backend=b)
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        x, y = torch.randn(256, 64), torch.randn(256, 64)
        losses = []
        for _ in range(10):
            loss = ((c(x) - y) ** 2).mean()
            loss.backward(); opt.step(); opt.zero_grad()
            losses.append(loss.item())
        r = b.reports[0]
        out[mode] = {"losses": losses, "decisions": [op.decision for op in r.ops],
                     "saved": r.compiled_saved_bytes, "planned": r.wtacrs_saved_bytes}
    print(json.dumps(out))
    """
)


@pytest.mark.skipif(not PYTHON, reason="set WTACRS_OTHER_TORCH_PYTHON to an interpreter with another torch (e.g. 2.11)")
def test_training_steps_under_another_torch():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([PYTHON, "-c", SCRIPT], capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-4000:]
    data = json.loads(out.stdout.strip().splitlines()[-1])
    for mode in ("compute", "memory", "all"):
        r = data[mode]
        assert r["losses"][-1] < r["losses"][0], (data["torch"], mode, r["losses"])
        assert r["saved"] == r["planned"], (data["torch"], mode)
    assert data["compute"]["decisions"] == ["compute", "compute"]
    assert "memory" in data["all"]["decisions"]
