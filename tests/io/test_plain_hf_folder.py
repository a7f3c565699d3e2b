"""A Hugging Face model pruned with ``uniform_widths`` and saved by ``surgery.io.save`` is a
plain Hugging Face folder: transformers' ``AutoModel*.from_pretrained`` loads it in a fresh
interpreter that never imports surgery, and computes what the pruned model computed.

Every family prunes by MI with calibration data, as a user would; one subprocess loads them
all (importing transformers once) and checks that no ``surgery`` module was imported.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import surgery
from helpers.transformer_zoo import inputs, logits, make
from surgery import io

AUTO = {"bert": "AutoModelForSequenceClassification",
        "roberta": "AutoModelForSequenceClassification",
        "electra": "AutoModelForSequenceClassification",
        "distilbert": "AutoModelForSequenceClassification",
        "mpnet": "AutoModelForSequenceClassification",
        "hf_vit": "AutoModelForImageClassification",
        "hf_deit": "AutoModelForImageClassification"}

CUT = {"electra": {"neuron", "hidden"},  # its embedding_size
       "hf_vit": {"head", "hidden", "neuron"}, "hf_deit": {"head", "hidden", "neuron"}}
"""Kinds cut under uniform_widths (default: FFN neurons only, a BERT-style config)."""

_CHILD = """
import json, sys, torch, transformers
torch.set_num_threads(1)
for name, folder, auto in json.loads(sys.argv[1]):
    model = getattr(transformers, auto).from_pretrained(folder).eval()
    x = torch.load(f"{folder}/../{name}-inputs.pt")
    with torch.no_grad():
        torch.save(model(**x).logits, f"{folder}/../{name}-hf.pt")
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("surgery", "surgery_plugins"))))
"""


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("plain")
    jobs, pruned = [], {}
    for name, auto in AUTO.items():
        dense = make(name)
        x = inputs(name, dense)
        calib = [inputs(name, dense, seed=s) for s in range(3)]
        small, plan = surgery.prune(dense, x, calib, sparsity=0.3, budget="params",
                                    uniform_widths=True)
        folder = io.save(small, root / name, plan, dense)
        torch.save(x, root / f"{name}-inputs.pt")
        pruned[name] = (small, x, plan, folder)
        jobs.append([name, str(folder), auto])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(jobs)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    imported = json.loads(done.stdout.strip().splitlines()[-1])
    return {"root": root, "pruned": pruned, "surgery modules": imported}


def test_the_loading_process_never_imported_surgery(loaded):
    assert loaded["surgery modules"] == []


@pytest.mark.parametrize("name", list(AUTO))
def test_from_pretrained_alone_computes_the_pruned_model(loaded, name):
    small, x, plan, folder = loaded["pruned"][name]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    widths: dict[tuple[str, int], set[int]] = {}
    for g in plan.groups:
        widths.setdefault((g.kind, g.atoms), set()).add(len(g.kept))
    assert all(len(v) == 1 for v in widths.values()), widths  # one width per kind and size
    cut = {g.kind for g in plan.groups if len(g.kept) < g.atoms}
    assert cut == CUT.get(name, {"neuron"}) and plan.budget["uniform_widths"] is True
    again = torch.load(loaded["root"] / f"{name}-hf.pt")
    assert torch.equal(again, logits(small, x))
