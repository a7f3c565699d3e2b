"""``surgery prune --budget latency``: the options, the report's latency section, the errors.

The prune runs on a deterministic fake device (times from shapes), so what is asserted cannot
hang on a busy machine's clock: asked, modelled and measured speedups are reported, the latency
model is drawn and cached, and bad input is one clear line. Measured numbers are the
benchmark's (benchmarks/latency_budget.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from helpers.fake_timer import FakeTimer
from surgery import latency
from surgery.cli import app

TINY = ["helpers.cli_models:tiny_resnet", "--input-size", "3,16,16"]
DATA = ["--data", "helpers.cli_models:batches"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_prune_to_a_speedup_reports_asked_modelled_and_measured(tmp_path: Path, monkeypatch
                                                                ) -> None:
    """The whole command on a deterministic device (the fake timer prices layers from their
    shapes): a real clock on a shared machine can make a tiny model's table say anything, and
    the real timer has its own test (tests/budget/test_latency.py)."""
    from surgery.cut.plan import PruningPlan

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "timer_for", lambda spec: FakeTimer(multiple=4, penalty=0.3))
    res = invoke("prune", *TINY, *DATA, "--out", "lat", "--budget", "latency", "--speedup",
                 "1.2", "--latency-batch", "128", "--round-to", "auto", "--threads", "1",
                 "--eval-samples", "16")
    assert res.exit_code == 0, res.output
    assert "asked 1.20x faster, modelled" in res.output and "measured" in res.output
    folder = tmp_path / "lat"
    plan = PruningPlan.load(folder / "plan.json")
    lat = plan.budget["latency"]
    assert lat["asked_speedup"] == 1.2 and lat["batch"] == 128 and lat["backend"] == "torch"
    assert 1 <= len(lat["attempts"]) <= 2 and lat["achieved_speedup"] > 0
    assert isinstance(plan.budget["round_to"], int)  # "auto" became the measured multiple
    md = (folder / "report.md").read_text()
    assert "## Latency budget" in md and "![latency model](latency_model.png)" in md
    assert "--budget latency --speedup 1.2" in md
    assert (folder / "latency_model.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<h2>Latency budget</h2>" in (folder / "report.html").read_text()
    assert list((tmp_path / "cache" / "latency").glob("*.json"))  # the table, cached
    assert json.loads((folder / "metrics.json").read_text())["settings"]["speedup"] == 1.2


def test_bad_latency_options_are_one_clear_line(tmp_path: Path) -> None:
    for args, message in [
        (["--budget", "latency"], "needs target_speedup"),
        (["--budget", "latency", "--speedup", "0.5"], "below 1"),
        (["--speedup", "2"], "for budget='latency'"),
        (["--budget", "latency", "--speedup", "2", "--device", "cuda:7"], "cuda"),
        (["--round-to", "fast"], "--round-to must be"),
    ]:
        res = invoke("prune", *TINY, *DATA, "--out", str(tmp_path / "x"), *args)
        assert res.exit_code == 1 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output
    assert list(tmp_path.iterdir()) == []
