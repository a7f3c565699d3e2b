"""A pruned transformer saved with ``surgery.io.save`` and loaded in a *fresh interpreter* has
every width attribute and config field its sliced weights imply, and computes what the pruned
model computed.

In the process that pruned, tracing has already run the plugins' leaf hooks; a fresh process
loads without tracing, so fix-ups that found attention modules through tables filled while
tracing (or through a ``heads * head_dim == rows`` check, false after slicing) left the dense
head counts and config behind. Heads, FFN neurons and hidden dims are all cut, differently
per layer. One subprocess loads every family (each load starts from nothing traced: loading
never traces), and each family is then checked as its own test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers.transformer_zoo import TIMM_KWARGS, inputs, logits, make
from helpers.widths import attribute_report, config_report
from surgery import io
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups

FAMILIES = ["bert", "roberta", "electra", "distilbert", "mpnet", "hf_vit", "hf_deit",
            "timm_vit"]
HEAD_SIZE = {"timm_vit": 64}  # the others: 16
RATIOS = (0.75, 0.5)  # kept share of the 1st, 2nd ... group of each (kind, size): per layer

_CHILD = """
import json, sys, torch
torch.set_num_threads(1)
from surgery import io
from helpers.transformer_zoo import logits
from helpers.widths import attribute_report, config_report
out = {}
for name, folder, head_size in json.loads(sys.argv[1]):
    model = io.load(folder)
    out[name] = {"attributes": attribute_report(model, head_size),
                 "config": config_report(model, head_size)}
    try:
        x = torch.load(f"{folder}/../{name}-inputs.pt")
        torch.save(logits(model, x), f"{folder}/../{name}-reloaded.pt")
    except Exception as exc:  # reported by the logits test, after the widths
        out[name]["error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out, default=repr))
"""


def _kept(coupling, seed: int = 0) -> dict[int, list[int]]:
    """Cut every prunable group, the n-th group of each (kind, atoms) by RATIOS[n]: heads and
    FFN widths differ across layers; atoms kept at random positions."""
    rng = np.random.default_rng(seed)
    seen: dict[tuple[str, int], int] = {}
    kept = {}
    for g in coupling.prunable:
        n = seen.get((g.kind, g.atoms), 0)
        seen[(g.kind, g.atoms)] = n + 1
        k = max(1, round(g.atoms * RATIOS[n % len(RATIOS)]))
        kept[g.id] = sorted(rng.choice(g.atoms, k, replace=False).tolist())
    return kept


def _architecture(name: str, dense: torch.nn.Module) -> io.Architecture:
    if name.startswith("timm"):
        return io.Architecture.timm("vit_tiny_patch16_224", **TIMM_KWARGS)
    return io.Architecture.transformers(dense)


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory) -> dict:
    """Prune and save every family here, reload them all in one fresh interpreter."""
    root = tmp_path_factory.mktemp("fresh")
    jobs, pruned = [], {}
    for name in FAMILIES:
        dense = make(name)
        x = inputs(name, dense)
        coupling = find_groups(trace(dense, x))
        plan = build_plan(coupling, _kept(coupling), criterion="test", target="output",
                          budget={})
        small = apply_plan(dense, plan, x)
        kinds = {g.kind for g in plan.groups if len(g.kept) < g.atoms}
        assert {"head", "neuron", "hidden"} <= kinds, (name, kinds)
        folder = io.save(small, root / name, plan, _architecture(name, dense))
        torch.save(x, root / f"{name}-inputs.pt")
        head_size = HEAD_SIZE.get(name, 16)
        pruned[name] = (small, x, head_size)
        jobs.append([name, str(folder), head_size])
    tests = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(tests), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    return {"root": root, "report": report, "pruned": pruned}


def _mismatches(report: dict) -> dict:
    return {k: v for k, v in report.items() if _plain(v[0]) != _plain(v[1])}


def _plain(v):
    """JSON turns tuples into lists; compare them alike."""
    return json.loads(json.dumps(v, default=repr))


@pytest.mark.parametrize("name", FAMILIES)
def test_fresh_reload_has_the_widths_its_weights_imply(reloaded, name):
    got = reloaded["report"][name]
    assert got["attributes"], "no width attribute found: the check checks nothing"
    assert not _mismatches(got["attributes"]), _mismatches(got["attributes"])
    assert not _mismatches(got["config"]), _mismatches(got["config"])
    if not name.startswith("timm"):
        assert "config.surgery_layer_sizes" in got["config"]  # heads differ across layers


@pytest.mark.parametrize("name", FAMILIES)
def test_fresh_reload_computes_what_the_pruned_model_computed(reloaded, name):
    small, x, head_size = reloaded["pruned"][name]
    assert "error" not in reloaded["report"][name], reloaded["report"][name]["error"]
    again = torch.load(reloaded["root"] / f"{name}-reloaded.pt")
    assert torch.equal(again, logits(small, x))
    # and the model that pruned agrees with the fresh one on every width
    here = {"attributes": attribute_report(small, head_size),
            "config": config_report(small, head_size)}
    assert _plain(here) == reloaded["report"][name]
