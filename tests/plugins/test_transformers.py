"""Transformers: BERT family and ViT capture, head/neuron/hidden groups, pruning, fix-ups.

Every model is a real ``transformers`` / ``timm`` class with a tiny config (see
``transformer_zoo``). Text inputs carry an attention mask with real padding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from helpers.transformer_zoo import IMAGE, LENGTHS, TEXT, encoder_params, inputs, logits, make
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan
from surgery.graph.capture import trace
from surgery.graph.groups import find_groups

ALL = TEXT + IMAGE
_CACHE: dict[str, tuple] = {}


def coupled(name: str):
    """(model, inputs, coupling), built once per session; tests must not modify the model."""
    if name not in _CACHE:
        model = make(name)
        x = inputs(name, model)
        _CACHE[name] = (model, x, find_groups(trace(model, x)))
    return _CACHE[name]


def plan_for(coupling, kept):
    return build_plan(coupling, kept, criterion="test", target="output", budget={})


def by_kind(coupling, kind):
    return [g for g in coupling.groups if g.kind == kind]


# ---------------------------------------------------------------------------------------
# Capture and groups
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_keep_everything_is_identity(name):
    model, x, c = coupled(name)
    reference = logits(model, x)
    out = c.capture.graph_module(*c.capture.example_args)
    traced = out if isinstance(out, torch.Tensor) else out["logits"]
    assert (traced - reference).abs().max().item() < 1e-5, "the traced graph computes another function"
    pruned = apply_plan(model, plan_for(c, {}), x)
    assert (logits(pruned, x) - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ALL)
def test_heads_neurons_and_hidden_are_prunable_groups(name):
    model, _, c = coupled(name)
    layers = 2
    heads = by_kind(c, "head")
    neurons = [g for g in by_kind(c, "neuron") if g.atoms in (128, 768)]
    hidden = [g for g in by_kind(c, "hidden") if g.prunable]
    n_heads = 3 if name.startswith("timm") else 4
    # MPNet shares one relative-position bias table across layers: head h of every layer is
    # one atom, so its heads form a single group
    assert len(heads) == (1 if name == "mpnet" else layers)
    assert all(g.prunable and g.atoms == n_heads for g in heads)
    assert len(neurons) == layers and all(g.prunable for g in neurons)
    assert hidden, "the residual stream must be prunable"
    width = 192 if name.startswith("timm") else 64
    assert any(g.atoms == width for g in hidden)
    outputs = [g for g in c.groups if g.reason == "model output"]
    assert outputs and not any(g.prunable for g in outputs)


def test_mpnet_heads_include_the_shared_position_bias():
    _, _, c = coupled("mpnet")
    (group,) = by_kind(c, "head")
    key = ("mpnet.encoder.relative_attention_bias.weight", 1)
    assert key in group.slices
    assert [list(p) for p in group.slices[key]] == [[h] for h in range(4)]
    assert ("mpnet.encoder.layer.1.attention.attn.q.weight", 0) in group.slices


# ---------------------------------------------------------------------------------------
# Pruning about half of the encoder
# ---------------------------------------------------------------------------------------


def _attentions(model):
    from surgery_plugins import hf_encoders as bert
    from surgery_plugins import vision_transformers as vit

    found = [(m, lay) for _, m, lay in bert.attention_modules(model)]
    found += [(m, vit.TIMM_LAYOUT) for _, m in vit.timm_attention_modules(model)]
    assert len(found) == 2
    return found


def _random_kept(coupling, ratio: float, seed: int = 0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {g.id: sorted(rng.choice(g.atoms, max(1, round(ratio * g.atoms)),
                                    replace=False).tolist())
            for g in coupling.prunable}


@pytest.mark.parametrize("name", ALL)
def test_half_of_the_encoder_pruned_runs_unchanged_interface(name):
    model, x, c = coupled(name)
    kept = _random_kept(c, 0.7)
    kinds = {c.group(gid).kind for gid, k in kept.items() if len(k) < c.group(gid).atoms}
    assert {"head", "neuron", "hidden"} <= kinds
    pruned = apply_plan(model, plan_for(c, kept), x)
    for module, layout in _attentions(pruned):  # head counts follow the sliced weights
        rows = getattr(module, layout.first_projection()).out_features
        assert getattr(module, layout.heads) * getattr(module, layout.head_dim) * (
            3 if layout.qkv else 1) == rows
    removed = 1 - encoder_params(pruned) / encoder_params(model)
    assert 0.4 <= removed <= 0.65, removed
    out = logits(pruned, x)
    assert out.shape == logits(model, x).shape and torch.isfinite(out).all()
    if name in TEXT:
        # padding is still masked: each padded row equals that row run alone, unpadded
        for row, length in enumerate(LENGTHS):
            alone = {k: v[row:row + 1, :length] for k, v in x.items()}
            assert (logits(pruned, alone)[0] - out[row]).abs().max().item() < 1e-5
        # and the pruned model runs on another batch shape with no hand edits
        other = {k: v[:2, :7] for k, v in x.items()}
        assert logits(pruned, other).shape == (2, out.shape[-1])


@pytest.mark.parametrize("name", ["bert", "distilbert", "electra", "hf_vit"])
def test_uniform_pruning_updates_the_config(name):
    model, x, c = coupled(name)
    kept = {}
    for g in c.prunable:
        keep = g.atoms // 2 if g.kind in ("head", "neuron") else None
        if g.kind == "hidden":
            # two heads of 16 in 32 dims: a config BERT can express; ELECTRA's 32 embedding
            # dims must stay apart from the hidden size (32 == 32 would drop its projection)
            keep = {64: 32, 32: 16}[g.atoms]
        if keep:
            kept[g.id] = list(range(keep))
    pruned = apply_plan(model, plan_for(c, kept), x)
    cfg = pruned.config
    assert cfg.hidden_size == 32 and cfg.num_attention_heads == 2
    ffn = cfg.hidden_dim if name == "distilbert" else cfg.intermediate_size
    assert ffn == 64
    assert getattr(cfg, "surgery_layer_sizes", None) is None
    rebuilt = type(pruned)(cfg)
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == shapes


def test_non_uniform_sizes_are_recorded_per_layer():
    model, x, c = coupled("bert")
    heads = by_kind(c, "head")
    pruned = apply_plan(model, plan_for(c, {heads[0].id: [0, 1, 2], heads[1].id: [3]}), x)
    sizes = pruned.config.surgery_layer_sizes
    assert sizes["num_attention_heads"] == [3, 1]
    assert sizes["head_dim"] == [16, 16]
    assert pruned.bert.encoder.layer[1].attention.self.num_attention_heads == 1
    assert pruned.bert.encoder.layer[1].attention.self.all_head_size == 16


# ---------------------------------------------------------------------------------------
# One head: exactly its rows and columns go, and the function is that of a silenced head
# ---------------------------------------------------------------------------------------

# name -> (q/k/v weight names with their row layout, output-projection weight)
HEAD_LAYOUT = {
    "bert": (["bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.0.attention.self.key",
              "bert.encoder.layer.0.attention.self.value"], "bert.encoder.layer.0.attention.output.dense"),
    "distilbert": (["distilbert.transformer.layer.0.attention.q_lin",
                    "distilbert.transformer.layer.0.attention.k_lin",
                    "distilbert.transformer.layer.0.attention.v_lin"],
                   "distilbert.transformer.layer.0.attention.out_lin"),
    "hf_vit": (["vit.layers.0.attention.q_proj", "vit.layers.0.attention.k_proj",
                "vit.layers.0.attention.v_proj"], "vit.layers.0.attention.o_proj"),
    "timm_vit": (["blocks.0.attn.qkv"], "blocks.0.attn.proj"),
}


@pytest.mark.parametrize("name", list(HEAD_LAYOUT))
def test_pruning_one_head_removes_exactly_that_head(name):
    model, x, c = coupled(name)
    projections, out_proj = HEAD_LAYOUT[name]
    group = next(g for g in by_kind(c, "head") if (f"{projections[0]}.weight", 0) in g.slices)
    n, drop = group.atoms, 1
    pruned = apply_plan(model, plan_for(c, {group.id: [h for h in range(n) if h != drop]}), x)
    dense, small = model.state_dict(), pruned.state_dict()
    head_dim = dense[f"{out_proj}.weight"].shape[1] // n
    cols = [i for i in range(n * head_dim) if i // head_dim != drop]
    for proj in projections:
        chunks = dense[f"{proj}.weight"].shape[0] // (n * head_dim)  # 3 for a fused qkv
        rows = [s * n * head_dim + i for s in range(chunks) for i in cols]
        for suffix in ("weight", "bias"):
            key = f"{proj}.{suffix}"
            if key in dense:
                assert torch.equal(small[key], dense[key][rows]), key
    assert torch.equal(small[f"{out_proj}.weight"], dense[f"{out_proj}.weight"][:, cols])
    assert torch.equal(small[f"{out_proj}.bias"], dense[f"{out_proj}.bias"])
    changed = {k for k in dense if k in small and small[k].shape != dense[k].shape}
    assert all(k.startswith(tuple(projections) + (out_proj,)) for k in changed), changed
    # removing the head computes what the dense model computes with that head silenced
    silenced = make(name)
    with torch.no_grad():
        w = silenced.get_submodule(out_proj).weight
        w[:, drop * head_dim:(drop + 1) * head_dim] = 0
    assert (logits(pruned, x) - logits(silenced, x)).abs().max().item() < 1e-5


def test_tied_embeddings_are_cut_together_and_stay_tied():
    from transformers import BertConfig, BertForMaskedLM

    from helpers.transformer_zoo import SMALL

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(**SMALL)).eval()
    x = inputs("bert", model)
    c = find_groups(trace(model, x))
    hidden = [g for g in c.prunable if g.kind == "hidden"]
    assert len(hidden) == 1  # the decoder reads the residual stream through the tied matrix
    assert ("cls.predictions.decoder.weight", 1) in hidden[0].slices
    pruned = apply_plan(model, plan_for(c, {g.id: list(range(g.atoms // 2)) for g in c.prunable}), x)
    assert pruned.get_output_embeddings().weight is pruned.get_input_embeddings().weight
    assert pruned.get_input_embeddings().weight.shape == (200, 32)
    assert logits(pruned, x).shape == logits(model, x).shape
