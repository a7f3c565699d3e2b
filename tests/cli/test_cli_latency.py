"""``surgery prune --budget latency``: the options, the report's latency section, the errors.

The prune times a tiny model on this CPU for real (a few seconds); no measured number is
asserted (they are the benchmark's), only that asked, modelled and measured speedups are
reported, the latency model is drawn, and bad input is one clear line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from surgery.cli import app

TESTS = Path(__file__).resolve().parent.parent
TINY = ["helpers.cli_models:tiny_resnet", "--input-size", "3,16,16"]
DATA = ["--data", "helpers.cli_models:batches"]


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


def test_prune_to_a_speedup_reports_asked_modelled_and_measured(tmp_path: Path) -> None:
    from surgery.cut.plan import PruningPlan

    exe = Path(sys.executable).with_name("surgery")
    root = TESTS.parent  # this checkout's surgery, not another installed one
    path = os.pathsep.join([str(TESTS), str(root), str(root / "plugins")])
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "COLUMNS": "200",
           "PYTHONWARNINGS": "ignore", "SURGERY_CACHE": str(tmp_path / "cache")}
    res = subprocess.run(
        [str(exe) if exe.exists() else shutil.which("surgery"), "prune", *TINY, *DATA,
         "--out", "lat", "--budget", "latency", "--speedup", "1.2", "--latency-batch", "128",
         "--round-to", "auto", "--threads", "1", "--eval-samples", "16"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "asked 1.20x faster, modelled" in res.stdout and "measured" in res.stdout
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
