"""Where a wtacrs compile spends its time (the report's ``compile_seconds``) and the progress
log of long compiles (the ``wtacrs_compile`` logger, quiet by default)."""

import logging

from test_planner import mlp_relu, run

STAGES = ("exact_baseline", "plan", "rewrite", "joint_pass", "inductor_forward", "inductor_backward", "backend")


def test_compile_seconds_by_stage():
    model, inputs = mlp_relu()
    report = run(model, inputs, mode="memory")  # the planner measures forward draws: trial partitions
    seconds = report.compile_seconds
    assert set(STAGES) <= set(seconds), seconds
    assert all(v >= 0 for v in seconds.values())
    # the pass's stages are inside the pass, and the pass inside the backend call
    assert seconds["exact_baseline"] + seconds["plan"] + seconds["rewrite"] <= seconds["joint_pass"]
    assert seconds["joint_pass"] + seconds["inductor_forward"] <= seconds["backend"]
    assert report.to_dict()["compile_seconds"] == seconds


def test_progress_is_logged_only_when_asked(caplog):
    assert not logging.getLogger("wtacrs_compile").isEnabledFor(logging.INFO), "quiet by default"
    model, inputs = mlp_relu()
    with caplog.at_level(logging.DEBUG, logger="wtacrs_compile"):
        run(model, inputs, mode="memory")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("wtacrs_compile")]
    assert any("matmul sites" in m and "candidates" in m for m in messages), messages
    assert any("planning 2 candidate sites (2 memory)" in m for m in messages), messages
    trials = [m for m in messages if m.startswith("wtacrs: trial partition")]
    assert len(trials) >= 3, messages  # all candidates, one per class left exact, the final plan
