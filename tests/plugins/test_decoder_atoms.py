"""Decoder LLMs (``surgery_plugins.decoder_llms``), what the atoms are: the KV groups, FFN
channels and hidden stream of a Llama (SmolLM, tied head), query-slot atoms, a planted copy of a
KV group cut by MI with the output projection refitted (Llama, and GPT-2 whose Conv1D is
transposed), Gemma's scaled embeddings after a hidden cut, and a layout the plugin refuses."""

from __future__ import annotations

import copy
import os

import pytest
import torch

import surgery
from helpers.decoder_zoo import (
    GQA,
    GQA_FAMILIES,
    calibration,
    check_widths,
    coupled,
    greedy_loop,
    inputs,
    logits,
    make,
)
from surgery.cut.apply import apply_plan
from surgery.cut.plan import build_plan
from surgery_plugins.decoder_llms import gqa_atoms

# ---------------------------------------------------------------------------------------
# The atoms of a Llama (SmolLM: tied LM head)
# ---------------------------------------------------------------------------------------


def _positions(group, key) -> list[list[int]]:
    return [a.tolist() for a in group.slices[key]]


def test_llama_groups_are_kv_groups_ffn_channels_and_one_hidden_stream():
    _, _, c = coupled("smollm")
    heads = [g for g in c.groups if g.kind == "head"]
    assert [g.name for g in heads] == [f"model.layers.{i}.self_attn" for i in range(2)]
    for i, g in enumerate(heads):
        p = f"model.layers.{i}.self_attn"
        assert g.prunable and g.atoms == 2  # two KV groups of two query heads each
        assert _positions(g, (f"{p}.q_proj.weight", 0)) == [list(range(32)), list(range(32, 64))]
        for kv in ("k_proj", "v_proj"):
            assert _positions(g, (f"{p}.{kv}.weight", 0)) == [list(range(16)),
                                                              list(range(16, 32))]
        assert _positions(g, (f"{p}.o_proj.weight", 1)) == [list(range(32)), list(range(32, 64))]
        readers = [r.reader for r in c.relations if r.group == g.id]
        assert readers == [f"{p}.o_proj"]  # scored by MI at o_proj's input, refitted there
    ffns = [g for g in c.groups if g.kind == "neuron"]
    for i, g in enumerate(ffns):
        p = f"model.layers.{i}.mlp"
        assert g.prunable and g.atoms == 128 and g.name == f"{p}.gate_proj (+1)"
        assert set(g.slices) == {(f"{p}.gate_proj.weight", 0), (f"{p}.up_proj.weight", 0),
                                 (f"{p}.down_proj.weight", 1)}
    (hidden,) = [g for g in c.groups if g.kind == "hidden"]
    assert hidden.prunable and hidden.atoms == 64 and hidden.name == "model.embed_tokens (+4)"
    assert {("lm_head.weight", 1), ("model.embed_tokens.weight", 1), ("model.norm.weight", 0),
            ("model.layers.1.post_attention_layernorm.weight", 0),
            ("model.layers.0.self_attn.k_proj.weight", 1),
            ("model.layers.0.self_attn.o_proj.weight", 0),
            ("model.layers.1.mlp.down_proj.weight", 0)} <= set(hidden.slices)
    assert len(c.prunable) == 5  # and nothing else: the vocabulary is the model's output


def test_decoders_get_the_transformer_kind_weights():
    from surgery.plugins._manager import call_hook

    model, _, _ = coupled("llama")
    weights = call_hook("surgery_kind_weights", model=model, kinds=["head", "neuron", "hidden"])
    assert weights == {"neuron": 1.0, "head": 0.5, "hidden": 0.1}


@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_query_slot_atoms_keep_the_kv_heads(name):
    model, x = make(name), inputs()
    with gqa_atoms("query"):
        c = surgery.couple(model, x)
    heads = [g for g in c.groups if g.kind == "head"]
    slots = [g for g in heads if g.prunable]
    kv = [g for g in heads if not g.prunable]
    assert len(slots) == 2 and all(g.atoms == 2 for g in slots)  # slot j of both KV groups
    q = next(k for k in slots[0].slices if ".q_proj." in k[0] or ".qkv_proj." in k[0])
    assert _positions(slots[0], q) == [list(range(16)) + list(range(32, 48)),
                                       list(range(16, 32)) + list(range(48, 64))]
    assert len(kv) == 2 and all("key/value heads" in g.reason for g in kv)
    plan = build_plan(c, {g.id: [1] for g in slots}, criterion="test", target="output",
                      budget={})
    small = apply_plan(model, plan, x)
    attention = small.model.layers[0].self_attn
    assert attention.num_key_value_groups == 1  # two KV heads, one query head each
    sizes = check_widths(small)
    assert sizes["q"] == [2, 2] and sizes["kv"] == [2, 2]
    with torch.no_grad():
        out = small.generate(**x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_loop(small, x, 4))


def test_gqa_atoms_mode_is_checked():
    with pytest.raises(ValueError, match="'kv' or 'query'"):
        with gqa_atoms("heads"):
            pass


# ---------------------------------------------------------------------------------------
# MI: a planted copy of a kept KV group goes; the output projection is refitted
# ---------------------------------------------------------------------------------------


def _rows_view(module: torch.nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]`` (GPT-2's Conv1D stores it transposed)."""
    return module.weight.t() if type(module).__name__ == "Conv1D" else module.weight


def _kv_model(family: str):
    """(model, layer 0's attention, [(weight [out, in], first row, rows of KV group 0)] for
    its query/key/value projections, output projection [out, in], its columns per group).
    Llama with eight query heads of 8 in four KV groups; GPT-2 with four heads (a group is one
    head)."""
    if family == "gpt2":
        model = make("gpt2")
        attention = model.transformer.h[0].attn
        parts = [(_rows_view(attention.c_attn), 64 * p, 16) for p in range(3)]
        out, width = _rows_view(attention.c_proj), 16
        name = "transformer.h.0.attn"
    else:
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                             num_key_value_heads=4, head_dim=8, intermediate_size=128,
                             vocab_size=200, max_position_embeddings=64, pad_token_id=0)
        model = LlamaForCausalLM(config).eval()
        attention = model.model.layers[0].self_attn
        # rows of one KV group: two query heads of 8, one key/value head of 8
        parts = [(attention.q_proj.weight, 0, 16), (attention.k_proj.weight, 0, 8),
                 (attention.v_proj.weight, 0, 8)]
        out, width = attention.o_proj.weight, 16
        name = "model.layers.0.self_attn"
    return model, name, parts, out, width


def _with_copied_kv_group(family: str):
    """Layer 0's KV group 0 made strong and group 1 an exact copy of it (query, key and value
    rows, output-projection columns): magnitude keeps both, joint MI only one."""
    model, name, parts, out, width = _kv_model(family)
    with torch.no_grad():
        for w, base, rows in parts:
            w[base:base + rows] *= 3
            w[base + rows:base + 2 * rows] = w[base:base + rows]
        out[:, :width] *= 3
        out[:, width:2 * width] = out[:, :width]
    return model, name, name + (".c_proj" if family == "gpt2" else ".o_proj")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_a_copied_kv_group_is_cut_by_mi_and_the_output_projection_refitted(family):
    model, attention, out_proj = _with_copied_kv_group(family)
    x = inputs()
    c = surgery.couple(model, x)
    group = next(g for g in c.groups if g.name == attention)
    assert group.atoms == 4 and out_proj in [r.reader for r in c.relations if r.group == group.id]
    layers = (attention, attention.replace(".0.", ".1."))
    options = surgery.PruneOptions(sparsity=0.5, budget="params", kinds={"head"},
                                   budget_scope=layers)
    small, plan = surgery.prune(model, x, calibration(12), options=options)
    kept = next(g.kept for g in plan.groups if g.id == group.id)
    assert 1 <= len(kept) < 4 and len({0, 1} & set(kept)) == 1, kept
    assert "fallbacks" not in plan.extra, plan.extra.get("fallbacks")
    assert out_proj in plan.extra["compensated"]
    check_widths(small)
    by_magnitude = surgery.make_plan(model, x, options=options, criterion="magnitude")
    assert {0, 1} <= set(next(g.kept for g in by_magnitude.groups if g.id == group.id))



@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_groups_are_scored_against_the_output_projection_not_the_stream(family):
    """Layer 0's KV group 0 loud (value rows x 4) and unread (its output-projection columns
    zero): nothing of it reaches the layer above, so MI cuts it. Scored against the residual
    stream (where no node shows the projection's output), it looked the most informative."""
    model, attention, parts, out, width = _kv_model(family)
    value, base, rows = parts[-1]
    with torch.no_grad():
        value[base:base + rows] *= 4
        out[:, :width] = 0
    x = inputs()
    group = next(g for g in surgery.couple(model, x).groups if g.name == attention)
    options = surgery.PruneOptions(sparsity=0.25, budget="params", kinds={"head"},
                                   budget_scope=(attention,), compensate=False)
    plan = surgery.make_plan(model, x, calibration(12), options=options)
    kept = next(g.kept for g in plan.groups if g.id == group.id)
    assert len(kept) == 3 and 0 not in kept, kept

def test_compensation_refits_a_transposed_conv1d_projection():
    """GPT-2's c_proj stores its weight [in, out]: the refit must land on the right axis, so
    the compensated cut is closer to the dense output than the plain one."""
    model, x = make("gpt2"), inputs()
    options = dict(sparsity=0.2, budget="params", kinds={"head"}, criterion="magnitude")
    calib = calibration(8)
    plain, _ = surgery.prune(model, x, calib, compensate=False, **options)
    refit, plan = surgery.prune(model, x, calib, **options)
    assert "transformer.h.0.attn.c_proj" in plan.extra["compensated"]
    batch = calibration(1, seed=99)[0]
    dense = logits(model, batch)
    error = [(logits(m, batch) - dense).pow(2).mean().item() for m in (plain, refit)]
    assert error[1] < error[0], error


# ---------------------------------------------------------------------------------------
# Gemma's scaled embeddings
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gemma2", "gemma3"])
def test_gemma_hidden_cut_survives_a_rebuild_from_its_config(name, tmp_path):
    from transformers import AutoModelForCausalLM

    model, x, c = coupled(name)
    kept = {g.id: list(range(g.atoms // 2)) if g.kind != "hidden" else list(range(48))
            for g in c.prunable}
    plan = build_plan(c, kept, criterion="test", target="output", budget={})
    small = apply_plan(model, plan, x)
    embeddings = small.get_input_embeddings()
    assert embeddings.scalar_embed_scale == pytest.approx(48 ** 0.5)  # sqrt of the new width
    assert getattr(small.config, "surgery_layer_sizes", None) is None
    check_widths(small)
    small.save_pretrained(tmp_path)  # a fresh model from the pruned config computes the same
    rebuilt = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert (logits(rebuilt, x) - logits(small, x)).abs().max().item() < 1e-5
    folder = surgery.io.save(small, tmp_path / "saved", plan, model)
    assert "config.json" in os.listdir(folder)
    assert torch.equal(logits(surgery.io.load(folder), x), logits(small, x))


def test_gemma_rescaled_embeddings_compute_what_the_plain_cut_computes():
    """The rescaling is a reparametrisation: the plain slice of the dense weights (scale
    sqrt(64) kept) and the rescaled model (table times sqrt(64/48), scale sqrt(48), tied
    head's final norm divided back) give the same logits."""
    from surgery_plugins import decoder_config

    model, x, c = coupled("gemma2")
    kept = {g.id: [i for i in range(64) if i % 4] for g in c.prunable if g.kind == "hidden"}
    plan = build_plan(c, kept, criterion="test", target="output", budget={})
    small = apply_plan(model, plan, x)
    plain, done = copy.deepcopy(model), set()
    with torch.no_grad():
        for name, dims in plan.keep.items():
            owner, _, attr = name.rpartition(".")
            tensor = plain.get_submodule(owner)._parameters[attr]
            if id(tensor) in done:  # the tied head: one tensor
                continue
            done.add(id(tensor))
            for dim, positions in dims.items():
                tensor.data = tensor.data.index_select(dim, torch.as_tensor(positions))
    assert plain.get_input_embeddings().scalar_embed_scale == 64 ** 0.5
    with torch.no_grad():  # the plain slice runs: every module reads its widths from weights
        reference = plain(**x).logits
    assert (logits(small, x) - reference).abs().max().item() < 1e-5
    assert decoder_config.describes(small)


def test_scaled_embeddings_without_a_final_norm_are_frozen():
    model = make("gemma2")
    model.model.norm = torch.nn.Identity()  # nowhere to fold the tied head's factor into
    c = surgery.couple(model, inputs())
    (hidden,) = [g for g in c.groups if g.kind == "hidden"]
    assert not hidden.prunable and hidden.reason == "frozen module model.embed_tokens"
    assert {g.kind for g in c.prunable} == {"head", "neuron"}


def test_gqa_families_really_have_grouped_heads():
    for name in GQA_FAMILIES:
        sizes = check_widths(make(name))
        assert sizes["q"] == [4, 4] and sizes["kv"] == [2, 2], name
    assert check_widths(make("gpt2"))["kv"] == [4, 4]


# ---------------------------------------------------------------------------------------
# A layout the rule does not describe is refused, naming the module
# ---------------------------------------------------------------------------------------


def test_attention_with_tensors_its_layout_does_not_name_is_refused():
    """OLMo 2 normalises q and k over all heads at once (norm weights of heads x head_dim):
    cutting a head would leave them unsliced, so its attention is refused (opaque, every
    channel through it frozen, the reason naming the module and the tensor) while the FFN
    channels are still cut."""
    from transformers import Olmo2Config, Olmo2ForCausalLM

    torch.manual_seed(0)
    model = Olmo2ForCausalLM(Olmo2Config(**GQA)).eval()
    x = inputs()
    c = surgery.couple(model, x)
    reason = c.propagation.opaque["model_layers_0_self_attn"]
    assert "model.layers.0.self_attn" in reason and "q_norm.weight (64,)" in reason
    assert not any(g.prunable for g in c.groups if g.kind in ("head", "hidden"))
    assert {g.kind for g in c.prunable} == {"neuron"}
    small, _ = surgery.prune(model, x, sparsity=0.2, budget="params", criterion="magnitude")
    assert small.model.layers[0].mlp.up_proj.out_features < 128
    with torch.no_grad():
        out = small.generate(**x, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(out, greedy_loop(small, x, 3))
