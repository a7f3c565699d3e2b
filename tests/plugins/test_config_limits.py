"""``surgery_config_limits``: under ``uniform_widths`` the built-in plugins keep uncut what a
plain Hugging Face config cannot express, and say why; the rest rebuilds from the config.

BERT-style configs derive the head size as ``hidden_size / num_attention_heads``, so only FFN
neurons can be cut (plus ELECTRA's separate ``embedding_size``); HF ViT/DeiT read
``config.head_dim``, so heads and hidden dims can be cut too. A pooler's or classification
head's neurons are ``hidden_size`` wide in every config: never expressible.
"""

from __future__ import annotations

import pytest

import surgery
from helpers.transformer_zoo import inputs, make
from surgery.api import couple
from surgery.budget.widths import limit_to_config
from surgery.errors import BudgetError
from surgery_plugins.hf_config import rebuilds

DERIVED = "cannot be written in a plain {}: it derives the head size from hidden_size"

# family: (config class, kinds still cut, kinds made unprunable)
EXPECTED = {
    "bert": ("BertConfig", {"neuron"}, {"head", "hidden", "neuron"}),
    "roberta": ("RobertaConfig", {"neuron"}, {"head", "hidden", "neuron"}),
    "electra": ("ElectraConfig", {"neuron", "hidden"}, {"head", "hidden", "neuron"}),
    "distilbert": ("DistilBertConfig", {"neuron"}, {"head", "hidden", "neuron"}),
    "mpnet": ("MPNetConfig", {"neuron"}, {"head", "hidden", "neuron"}),
    "hf_vit": ("ViTConfig", {"head", "hidden", "neuron"}, set()),
    "hf_deit": ("DeiTConfig", {"head", "hidden", "neuron"}, set()),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_what_a_plain_config_can_express(name):
    config, cut, spared = EXPECTED[name]
    model = make(name)
    coupling = couple(model, inputs(name, model))
    before = {g.id for g in coupling.prunable}
    reasons = limit_to_config(coupling, model, sparsity=0.3)
    assert {g.kind for g in coupling.prunable} == cut
    limited = [g for g in coupling.groups if g.id in before and not g.prunable]
    assert {g.kind for g in limited} == spared
    assert all(g.reason in reasons for g in limited)
    for kind in ("head", "hidden"):
        if kind in spared:
            assert f"kind {kind!r} {DERIVED.format(config)}" in reasons
    # every FFN stays prunable; what is spared among neurons is not an FFN
    ffn = [g for g in coupling.prunable if g.kind == "neuron"]
    assert len(ffn) == 2 and all(g.atoms == 128 for g in ffn)
    assert all("only FFN neurons have a width field" in g.reason
               for g in limited if g.kind == "neuron")


def test_without_uniform_widths_a_prune_does_not_rebuild():
    """(With it, tests/io/test_plain_hf_folder.py loads the result with from_pretrained.)"""
    model = make("bert")
    x = inputs("bert", model)
    small, _ = surgery.prune(model, x, [x], sparsity=0.3, budget="params")
    assert not rebuilds(small) and small.config.surgery_layer_sizes


def test_a_budget_ffn_alone_cannot_meet_says_why():
    model = make("bert")
    x = inputs("bert", model)
    with pytest.raises(BudgetError) as err:
        surgery.make_plan(model, x, sparsity=0.7, budget="params", budget_scope="bert.encoder",
                          criterion="magnitude", uniform_widths=True)
    message = str(err.value)
    assert "at most" in message and "asked for 70.0%" in message
    assert f"kind 'head' {DERIVED.format('BertConfig')}" in message
    assert "cuts only what the model's config can express" in message
    assert "prune without uniform_widths" in message
    # the same budget is reachable without the restriction
    surgery.make_plan(model, x, sparsity=0.7, budget="params", budget_scope="bert.encoder",
                      criterion="magnitude")


def test_models_without_a_config_keep_every_kind():
    """timm ViT: no config to write, so uniform_widths only evens the widths out."""
    model = make("timm_vit")
    coupling = couple(model, inputs("timm_vit", model))
    kinds = {g.kind for g in coupling.prunable}
    assert limit_to_config(coupling, model, sparsity=0.3) == []
    assert {g.kind for g in coupling.prunable} == kinds == {"head", "hidden", "neuron"}
