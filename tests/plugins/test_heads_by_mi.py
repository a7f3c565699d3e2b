"""Heads inside an attention module that holds its own output projection (DistilBERT, MPNet,
timm and Hugging Face ViT) are scored by MI like any group: calibration observes the input of
that projection (a module-input probe), joint selection drops a head that copies a kept one,
and compensation refits the projection. Before, these heads silently fell back to magnitude."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch

import surgery
from helpers.transformer_zoo import inputs, make

# family -> (attention module of layer 0, its q/k/v (or fused qkv) and output projection)
LAYOUTS = {
    "distilbert": ("distilbert.transformer.layer.0.attention", ("q_lin", "k_lin", "v_lin"),
                   "out_lin"),
    "mpnet": ("mpnet.encoder.layer.0.attention.attn", ("q", "k", "v"), "o"),
    "hf_vit": ("vit.layers.0.attention", ("q_proj", "k_proj", "v_proj"), "o_proj"),
    "timm_vit": ("blocks.0.attn", ("qkv",), "proj"),
}


def _plant(model: torch.nn.Module, family: str) -> tuple[str, int]:
    """Head 0 strong, head 1 an exact copy of it (rows of q, k, v and columns of the output
    projection): magnitude ranks both first, joint MI must keep only one."""
    attention, projections, out_proj, heads, dim = _attention(model, family)
    with torch.no_grad():
        for name in projections:
            w = getattr(attention, name).weight
            b = getattr(attention, name).bias
            for part in range(w.shape[0] // (heads * dim)):  # q, k, v of a fused qkv
                base = part * heads * dim
                w[base:base + dim] *= 3
                w[base + dim:base + 2 * dim] = w[base:base + dim]
                if b is not None:
                    b[base + dim:base + 2 * dim] = b[base:base + dim]
        out_proj.weight[:, :dim] *= 3
        out_proj.weight[:, dim:2 * dim] = out_proj.weight[:, :dim]
    return _out_name(family), heads


def _attention(model: torch.nn.Module, family: str
               ) -> tuple[torch.nn.Module, tuple[str, ...], torch.nn.Module, int, int]:
    """Layer 0's attention module, its q/k/v projection names, its output projection, its
    head count and head size."""
    path, projections, out = LAYOUTS[family]
    attention = model.get_submodule(path)
    out_proj = getattr(attention, out)
    heads = _heads(attention)
    return attention, projections, out_proj, heads, out_proj.in_features // heads


def _out_name(family: str) -> str:
    path, _, out = LAYOUTS[family]
    return f"{path}.{out}"


def _planted(family: str, plant: Callable[[torch.nn.Module, str], tuple[str, int]]
             ) -> tuple[torch.nn.Module, Any, list, str, int, Any, Any]:
    """(model with ``plant`` applied, example inputs, calibration batches, output projection's
    name, head count, the coupling's head group of layer 0)."""
    model = make(family)
    out_proj, heads = plant(model, family)
    x = inputs(family, model)
    calib = [inputs(family, model, seed=s) for s in range(2, 40)]
    coupling = surgery.couple(model, x)
    head_group = next(g for g in coupling.groups if g.kind == "head"
                      and any(k[0] == f"{out_proj}.weight" for k in g.slices))
    return model, x, calib, out_proj, heads, head_group, coupling


def _heads(attention: torch.nn.Module) -> int:
    for attr in ("n_heads", "num_heads", "num_attention_heads"):
        if isinstance(getattr(attention, attr, None), int):
            return getattr(attention, attr)
    return attention.config.num_attention_heads


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_a_copied_head_is_cut_and_the_projection_refitted(family: str) -> None:
    model, x, calib, out_proj, heads, head_group, coupling = _planted(family, _plant)
    readers = [r for r in coupling.relations if r.group == head_group.id]
    assert out_proj in [r.reader for r in readers], "no relation reads the heads"
    layer_0 = LAYOUTS[family][0]
    scope = (layer_0, layer_0.replace(".0.", ".1."))  # both layers' attention modules
    options = surgery.PruneOptions(sparsity=0.5, budget="params", kinds={"head"},
                                   budget_scope=scope)
    pruned, plan = surgery.prune(model, x, calib, options=options)
    kept = next(g.kept for g in plan.groups if g.id == head_group.id)
    assert 1 <= len(kept) < heads, kept
    assert len({0, 1} & set(kept)) == 1, f"kept {kept}: the copy of a kept head stayed"
    assert "fallbacks" not in plan.extra, plan.extra.get("fallbacks")
    assert out_proj in plan.extra["compensated"]
    by_magnitude = surgery.make_plan(model, x, options=options, criterion="magnitude")
    assert {0, 1} <= set(next(g.kept for g in by_magnitude.groups if g.id == head_group.id))


def _silence(model: torch.nn.Module, family: str) -> tuple[str, int]:
    """Head 0 loud (its value rows x 4) but unread: its columns of the output projection are
    zero. Only a criterion that scores heads against that projection's output sees that it
    carries nothing the layer above receives; against any stream node it looks strongest."""
    attention, projections, out_proj, heads, dim = _attention(model, family)
    with torch.no_grad():
        value = getattr(attention, projections[-1]).weight
        value[value.shape[0] - heads * dim:][:dim] *= 4  # the v part of a fused qkv too
        out_proj.weight[:, :dim] = 0
    return _out_name(family), heads


@pytest.mark.parametrize("family", sorted(LAYOUTS))
def test_heads_are_scored_against_their_own_projection_output(family: str) -> None:
    model, x, calib, out_proj, heads, head_group, _ = _planted(family, _silence)
    options = surgery.PruneOptions(sparsity=1 / heads, budget="params", kinds={"head"},
                                   budget_scope=(LAYOUTS[family][0],), compensate=False)
    plan = surgery.make_plan(model, x, calib, options=options)
    kept = next(g.kept for g in plan.groups if g.id == head_group.id)
    assert len(kept) == heads - 1 and 0 not in kept, f"kept {kept}: the unread head stayed"
