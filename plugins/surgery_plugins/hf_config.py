"""What a Hugging Face encoder's config says about a pruned model, and what it can say.

After slicing, :func:`update_config` writes the widths the weights imply into ``model.config``;
:func:`rebuilds` tells whether ``type(model)(config)`` has the model's shapes (then the folder
is a plain Hugging Face one); :func:`config_limits` tells, before pruning, which groups a
config cannot express even at one width per kind (``uniform_widths``). The attention modules
come in as ``(name, module, layout)`` triples found by :mod:`surgery_plugins.hf_encoders`.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from surgery.graph.rules.leaves import HeadLayout
from surgery_plugins.transformers_common import ffn_first_linears

Attentions = list[tuple[str, nn.Module, HeadLayout]]


def is_text_embeddings(module: nn.Module) -> bool:
    """A transformers ``*Embeddings`` module holding ``word_embeddings`` (text encoders)."""
    cls = type(module)
    return (cls.__module__.startswith("transformers.") and cls.__name__.endswith("Embeddings")
            and isinstance(getattr(module, "word_embeddings", None), nn.Embedding))


def layer_sizes(model: nn.Module, attentions: Attentions) -> dict[str, Any]:
    """Per-layer sizes of a (pruned) encoder, read from its weights and fixed attributes."""
    first = getattr(attentions[0][1], attentions[0][2].first_projection())
    sizes: dict[str, Any] = {
        "hidden_size": first.in_features,
        "num_attention_heads": [int(getattr(m, lay.heads)) for _, m, lay in attentions],
        "head_dim": [int(getattr(m, lay.head_dim)) for _, m, lay in attentions],
        "intermediate_size": [lin.out_features for _, lin in ffn_first_linears(model)],
    }
    embeddings = [m.word_embeddings.embedding_dim for m in model.modules()
                  if is_text_embeddings(m)]
    if embeddings:
        sizes["embedding_size"] = embeddings[0]
    return sizes


def update_config(model: nn.Module, attentions: Attentions) -> None:
    """Write the pruned sizes into ``model.config``.

    A size that differs across layers has no single config value: the scalar field gets the
    largest layer's (a width some layer really has, never the stale dense one), and
    ``config.surgery_layer_sizes`` records every layer's whenever the config does not rebuild
    the model, so ``from_pretrained`` on it fails loudly instead of loading other shapes."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    sizes = layer_sizes(model, attentions)
    if hasattr(config, "hidden_size"):
        config.hidden_size = sizes["hidden_size"]
    heads = max(sizes["num_attention_heads"])
    if hasattr(config, "num_attention_heads"):
        config.num_attention_heads = heads
    if sizes["intermediate_size"]:
        for attr in ("intermediate_size", "hidden_dim"):  # DistilBERT: hidden_dim
            if hasattr(config, attr) and attr not in getattr(config, "attribute_map", {}):
                setattr(config, attr, max(sizes["intermediate_size"]))
                break
    if "embedding_size" in sizes and getattr(config, "embedding_size", None) is not None:
        config.embedding_size = sizes["embedding_size"]
    head_dim = max(sizes["head_dim"])  # heads are cut whole: one head size
    if getattr(config, "head_dim", None) is not None or sizes["hidden_size"] // heads != head_dim:
        config.head_dim = head_dim  # read by ViT/DeiT and q_proj-style encoders
    if hasattr(config, "surgery_layer_sizes"):
        del config.surgery_layer_sizes
    if not rebuilds(model):
        config.surgery_layer_sizes = sizes


def rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has the model's parameter shapes (so that
    ``save_pretrained`` / ``from_pretrained`` round-trip). Built on the meta device."""
    fresh = _build(model, model.config)
    if fresh is None:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def _build(model: nn.Module, config: Any) -> nn.Module | None:
    try:
        with torch.device("meta"):
            return type(model)(copy.deepcopy(config))
    except Exception:
        return None


def reads_head_dim(model: nn.Module, attentions: Attentions) -> bool:
    """Whether the config sets the head size through ``head_dim`` (HF ViT) instead of deriving
    it as ``hidden_size / num_attention_heads`` (BERT): only then can a plain config hold cut
    heads or a cut hidden size. Found by building the architecture, on the meta device, from
    a config with another ``head_dim``."""
    name, module, layout = attentions[0]
    probe = int(getattr(module, layout.head_dim)) + 1
    config = copy.deepcopy(model.config)
    config.head_dim = probe
    fresh = _build(model, config)
    return fresh is not None and getattr(fresh.get_submodule(name), layout.head_dim) == probe


def config_limits(model: nn.Module, groups: list[Any], attentions: Attentions) -> dict[int, str]:
    """``{group id: why a plain config cannot express it}`` for the prunable ``groups`` of
    ``model`` cut to one width per kind (see the ``surgery_config_limits`` hook).

    Expressible: FFN neurons (``intermediate_size``), the embedding width where the config
    has ``embedding_size`` (ELECTRA), and, when the config reads ``head_dim``, heads and the
    hidden size. Not: other neurons (a pooler or classifier head is ``hidden_size`` wide, with
    no field of its own) and anything else."""
    config = type(model.config).__name__
    head_dim = reads_head_dim(model, attentions)
    ffn = {(f"{name}.weight", 0) for name, _ in ffn_first_linears(model)}
    hidden_in = {(f"{name}.{lay.first_projection()}.weight", 1) for name, _, lay in attentions}
    embedding_field = getattr(model.config, "embedding_size", None) is not None
    derived = "it derives the head size from hidden_size"
    limits = {}
    for g in groups:
        keys = set(g.slices)
        if g.kind == "neuron" and keys & ffn:
            continue
        if g.kind == "head" or (g.kind == "hidden" and keys & hidden_in):
            if not head_dim:
                limits[g.id] = f"kind {g.kind!r} cannot be written in a plain {config}: {derived}"
            continue
        if g.kind == "hidden" and embedding_field:
            continue
        if g.kind == "neuron":
            limits[g.id] = (f"kind 'neuron' of {', '.join(g.modules[:1])} cannot be written in "
                            f"a plain {config}: only FFN neurons have a width field "
                            "(intermediate_size); these are hidden_size wide")
        else:
            limits[g.id] = (f"kind {g.kind!r} cannot be written in a plain {config}: no field "
                            "holds its width")
    return limits


__all__ = ["is_text_embeddings", "layer_sizes", "update_config", "rebuilds", "reads_head_dim",
           "config_limits"]
