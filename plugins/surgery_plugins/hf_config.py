"""What a Hugging Face encoder's config says about a pruned model, and what it can say.

After slicing, :func:`update_config` writes the widths the weights imply into ``model.config``;
:func:`rebuilds` tells whether ``type(model)(config)`` has the model's shapes (then the folder
is a plain Hugging Face one). The attention modules
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


__all__ = ["is_text_embeddings", "layer_sizes", "update_config", "rebuilds"]
