"""Decoder LLMs (``surgery_plugins.decoder_llms``): Llama, SmolLM, Mistral, Qwen2, Qwen3,
Gemma 2, Gemma 3, Phi-3, GPT-2, GPT-NeoX and OPT, as real ``transformers`` causal LMs with
tiny random configs (``helpers.decoder_zoo``).

Per family: keeping everything reproduces the logits exactly; 30% cuts (magnitude, and MI
with calibration batches) and a hand-made plan with different widths in each layer run;
``generate()`` with the KV cache (dynamic and static) gives the tokens of greedy decoding
without cache and of a plain forward-argmax loop; sdpa and eager agree; left padding is
masked; save/load rebuilds the model in a fresh process. What the atoms are:
``test_decoder_atoms.py``.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgery
from helpers.decoder_zoo import (
    FAMILIES,
    LENGTHS,
    calibration,
    check_widths,
    coupled,
    greedy_loop,
    logits,
    positions,
)
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan

_PRUNED: dict[tuple[str, str], tuple] = {}


def _uneven(coupling) -> dict[int, list[int]]:
    """Different widths in each layer: layer 0 keeps its last KV group (last two heads of a
    multi-head model), layer 1 both KV groups (all heads but the first); FFNs keep every other
    channel and the first 100; three quarters of the hidden dims stay."""
    heads = [g for g in coupling.prunable if g.kind == "head"]
    ffns = [g for g in coupling.prunable if g.kind == "neuron"]
    second = heads[1].atoms
    kept = {heads[0].id: list(range(heads[0].atoms))[-max(1, heads[0].atoms // 2):],
            heads[1].id: list(range(second > 2, second)),
            ffns[0].id: list(range(0, ffns[0].atoms, 2)), ffns[1].id: list(range(100))}
    for g in coupling.prunable:
        if g.kind == "hidden":
            kept[g.id] = [i for i in range(g.atoms) if i % 4]
    return kept


def pruned(name: str, how: str):
    """(plan, pruned model) of ``name`` cut 30% of its parameters by magnitude (every kind at
    the same rate) or by MI (the plugin's kind weights), or by the uneven plan."""
    if (name, how) not in _PRUNED:
        model, x, c = coupled(name)
        if how == "uneven":
            plan = build_plan(c, _uneven(c), criterion="test", target="output", budget={})
            _PRUNED[name, how] = (plan, apply_plan(model, plan, x))
        elif how == "magnitude":
            small, plan = surgery.prune(model, x, sparsity=0.3, budget="params",
                                        criterion="magnitude", kind_weights="uniform")
            _PRUNED[name, how] = (plan, small)
        else:
            small, plan = surgery.prune(model, x, calibration(), sparsity=0.3, budget="params")
            _PRUNED[name, how] = (plan, small)
    return _PRUNED[name, how]


def params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# ---------------------------------------------------------------------------------------
# Every family
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FAMILIES)
def test_keep_all_reproduces_the_logits_exactly(name):
    model, x, c = coupled(name)
    assert not c.propagation.opaque, c.propagation.opaque
    kinds = {g.kind for g in c.prunable}
    assert kinds == {"head", "neuron", "hidden"}, [(g.name, g.kind, g.reason) for g in c.groups]
    same, _ = surgery.prune(model, x, sparsity=0.0, criterion="magnitude", compensate=False)
    assert torch.equal(logits(same, x), logits(model, x))
    traced = c.capture.graph_module(*c.capture.example_args)["logits"]
    assert torch.equal(traced, logits(model, x))


@pytest.mark.parametrize("how", ["magnitude", "mi"])
@pytest.mark.parametrize("name", FAMILIES)
def test_a_30_percent_cut_runs(name, how):
    model, x, _ = coupled(name)
    plan, small = pruned(name, how)
    assert 0.25 <= 1 - params(small) / params(model) <= 0.35
    out = logits(small, x)
    assert out.shape == logits(model, x).shape and torch.isfinite(out).all()
    cut = {g.kind for g in plan.groups if len(g.kept) < g.atoms}
    assert cut >= ({"neuron", "hidden"} if how == "magnitude" else {"neuron"}), cut
    if how == "mi":
        assert "fallbacks" not in plan.extra, plan.extra.get("fallbacks")
    check_widths(small)


@pytest.mark.parametrize("how", ["mi", "uneven"])
@pytest.mark.parametrize("name", FAMILIES)
def test_generate_with_the_cache_matches_greedy_decoding(name, how):
    _, x, _ = coupled(name)
    _, small = pruned(name, how)
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        cached = small.generate(**x, **settings)
        uncached = small.generate(**x, use_cache=False, **settings)
        static = small.generate(**x, cache_implementation="static", **settings)
    assert torch.equal(cached, uncached) and torch.equal(cached, static)
    assert torch.equal(cached, greedy_loop(small, x, 6))


@pytest.mark.parametrize("name", FAMILIES)
def test_sdpa_and_eager_agree_and_padding_is_masked(name):
    _, x, _ = coupled(name)
    _, small = pruned(name, "uneven")
    check_widths(small)
    pos = positions(x["attention_mask"])
    eager = copy.deepcopy(small)
    eager.set_attn_implementation("eager")
    for module in eager.modules():  # per-layer config views follow the shared config
        if hasattr(module, "config"):
            assert module.config._attn_implementation == "eager"
    reference = logits(eager, x, position_ids=pos)
    real = x["attention_mask"].bool()  # padding positions attend to nothing: undefined
    if type(small)._supports_sdpa:
        sdpa = copy.deepcopy(small)
        sdpa.set_attn_implementation("sdpa")
        assert (logits(sdpa, x, position_ids=pos) - reference)[real].abs().max().item() < 1e-5
    # each left-padded row computes what that row computes alone, unpadded
    n = max(LENGTHS)
    for row, length in enumerate(LENGTHS):
        alone = {k: v[row:row + 1, n - length:] for k, v in x.items()}
        got = logits(eager, alone)[0]
        assert (got - reference[row, n - length:]).abs().max().item() < 1e-4, row


_LOAD_SCRIPT = """
import sys, torch
from helpers.decoder_zoo import check_widths
from surgery import io
for folder in sys.argv[1:]:
    model = io.load(folder)
    x, expected = torch.load(folder + ".pt")
    with torch.no_grad():
        got = model(**x).logits
    assert torch.equal(got, expected), (folder, (got - expected).abs().max())
    check_widths(model)
    print("ok", folder)
"""


def test_save_and_load_in_a_fresh_process(tmp_path):
    folders = []
    for name in FAMILIES:
        dense, x, _ = coupled(name)
        for how in ("uneven", "mi"):
            plan, small = pruned(name, how)
            folder = tmp_path / f"{name}-{how}"
            surgery.io.save(small, folder, plan, dense)
            torch.save((x, logits(small, x)), f"{folder}.pt")
            folders.append(str(folder))
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(tests), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, *folders], env=env,
                         capture_output=True, text=True, timeout=300, cwd=tests.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("ok ") == len(folders)
