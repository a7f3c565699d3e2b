"""Hugging Face encoder plugin: the BERT family and every encoder with the same layout.

Covers ``BertModel`` and its task heads, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA, DistilBERT,
MPNet, and the attention / FFN / config side of HF ViT and DeiT (their embeddings are in
:mod:`surgery_plugins.vit`). Modules are recognised by structure, not by class name lists: an
attention module from ``transformers`` whose children and attributes match one of
:data:`HF_LAYOUTS`, an embeddings module holding ``word_embeddings``.

Capture. ``trace(model, {"input_ids": ..., "attention_mask": ...})`` works because:

* attention modules are fx leaves described by :func:`surgery.graph.rules.leaves.attention_rule`
  (whole heads are atoms; their forwards unpack traced shapes and dispatch to sdpa/eager);
* embeddings modules are leaves described by ``embeddings_rule`` (their forwards build position
  and token-type ids with branches on ``None``);
* the mask builders of ``transformers.masking_utils`` are autowrapped: the graph calls them as
  one op, so padding masks of any content work at run time (the config they take is kept as a
  graph constant by the capture).

Three atom kinds come out (see ``surgery_group_kind``): ``head`` (q/k/v rows and output-projection
columns of one head), ``neuron`` (one FFN intermediate unit; also pooler/classifier-head hidden
units) and ``hidden`` (one residual-stream dimension through every embedding table, norm and
projection). The classifier's outputs are the model's outputs and stay.

Fix-ups after slicing: head counts and their products on every attention module (``fix_attention``),
MPNet's shared relative-position bias head count, and the config: ``hidden_size``,
``num_attention_heads``, ``intermediate_size`` (DistilBERT's ``dim``/``n_heads``/``hidden_dim``
through the config's attribute map), ELECTRA's ``embedding_size``, ``head_dim`` where the head
size no longer equals ``hidden_size // num_attention_heads``. When the config cannot describe
the pruned model (sizes differ across layers, or the architecture derives the head size from
the hidden size), ``config.surgery_layer_sizes`` records the per-layer sizes and
``from_pretrained`` on that config fails loudly on shape mismatch; :func:`surgery.io.load`
rebuilds such models from the base config and the plan.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from surgery.graph.rules.leaves import (
    HeadLayout,
    attention_rule,
    embeddings_rule,
    fix_attention,
    matches,
)
from surgery.hookspecs import hookimpl
from surgery_plugins.transformers_common import (
    KindMap,
    ffn_first_linears,
    head_keys,
    is_module_of,
    transformer_kind_weights,
)

HF_LAYOUTS: tuple[HeadLayout, ...] = (
    # BERT, RoBERTa, XLM-RoBERTa, CamemBERT, ELECTRA (output projection in *SelfOutput)
    HeadLayout(q="query", k="key", v="value", heads="num_attention_heads",
               head_dim="attention_head_size", products=("all_head_size",)),
    # DistilBERT
    HeadLayout(q="q_lin", k="k_lin", v="v_lin", out="out_lin", heads="n_heads",
               head_dim="attention_head_size", hidden=("dim",)),
    # MPNet
    HeadLayout(q="q", k="k", v="v", out="o", heads="num_attention_heads",
               head_dim="attention_head_size", products=("all_head_size",)),
    # ViT, DeiT (and other encoders written in the current q_proj/o_proj style)
    HeadLayout(q="q_proj", k="k_proj", v="v_proj", out="o_proj", heads="num_attention_heads",
               head_dim="head_dim"),
)

_LAYOUT_OF: dict[type, HeadLayout] = {}
_EMBEDDINGS: set[type] = set()


def _is_hf(model: nn.Module) -> bool:
    return is_module_of(model, ("transformers.",))


def attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, HeadLayout]]:
    """Every self-attention module of a transformers model with a known layout, in order."""
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__module__.startswith("transformers.") or "Cross" in cls.__name__:
            continue
        layout = _LAYOUT_OF.get(cls)
        if layout is not None and matches(module, layout, sizes=False):
            yield name, module, layout
            continue
        layout = next((lay for lay in HF_LAYOUTS if matches(module, lay)), None)
        if layout is not None:
            yield name, module, layout


def _is_text_embeddings(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__.startswith("transformers.") and cls.__name__.endswith("Embeddings")
            and isinstance(getattr(module, "word_embeddings", None), nn.Embedding))


@hookimpl
def surgery_leaf_modules(model: nn.Module) -> list[type]:
    if not _is_hf(model):
        return []
    leaves: list[type] = []
    for _, module, layout in attention_modules(model):
        _LAYOUT_OF.setdefault(type(module), layout)
        leaves.append(type(module))
    for module in model.modules():
        if _is_text_embeddings(module):
            _EMBEDDINGS.add(type(module))
            leaves.append(type(module))
    return list(dict.fromkeys(leaves))


@hookimpl
def surgery_autowrap_functions(model: nn.Module) -> list[Callable]:
    if not _is_hf(model):
        return []
    from transformers import masking_utils

    names = ("create_bidirectional_mask", "create_causal_mask", "create_sliding_window_causal_mask")
    return [getattr(masking_utils, n) for n in names if hasattr(masking_utils, n)]


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    rules: dict[type, Callable] = {cls: attention_rule(lay) for cls, lay in _LAYOUT_OF.items()}
    rules.update({cls: embeddings_rule for cls in _EMBEDDINGS})
    return rules


@hookimpl
def surgery_function_rules() -> dict[Any, Callable]:
    """The mask builders read only the batch size, length, dtype and device of the embeddings
    they are given: no channel flows through them."""
    masking = sys.modules.get("transformers.masking_utils")
    if masking is None:
        return {}
    from surgery.graph.rules.tracks import no_channels

    names = ("create_bidirectional_mask", "create_causal_mask", "create_sliding_window_causal_mask")
    return {getattr(masking, n): no_channels for n in names if hasattr(masking, n)}


@hookimpl
def surgery_kind_weights(model: nn.Module, kinds: list[str]) -> dict[str, float] | None:
    return transformer_kind_weights(kinds) if _is_hf(model) and "head" in kinds else None


@hookimpl
def surgery_group_kind(group: Any, model: nn.Module) -> str | None:
    if not _is_hf(model):
        return None
    kinds = KindMap()
    for name, _, layout in attention_modules(model):
        kinds.head |= head_keys(name, layout)
    if not kinds.head:
        return None
    kinds.neuron |= {(f"{name}.weight", 0) for name, _ in ffn_first_linears(model)}
    return kinds.kind(group.slices, model)


@hookimpl
def surgery_fix_model(model: nn.Module) -> None:
    if not _is_hf(model):
        return
    attentions = list(attention_modules(model))
    for _, module, layout in attentions:
        fix_attention(module, layout)
    for module in model.modules():  # MPNet: one relative-position bias table for all layers
        bias = getattr(module, "relative_attention_bias", None)
        if isinstance(bias, nn.Embedding) and isinstance(getattr(module, "n_heads", None), int):
            module.n_heads = bias.embedding_dim
    if attentions:
        update_config(model, attentions)


def layer_sizes(model: nn.Module, attentions: list[tuple[str, nn.Module, HeadLayout]]
                ) -> dict[str, Any]:
    """Per-layer sizes of a (pruned) encoder, read from its weights."""
    first = getattr(attentions[0][1], attentions[0][2].first_projection())
    sizes: dict[str, Any] = {
        "hidden_size": first.in_features,
        "num_attention_heads": [int(getattr(m, lay.heads)) for _, m, lay in attentions],
        "head_dim": [int(getattr(m, lay.head_dim)) for _, m, lay in attentions],
        "intermediate_size": [lin.out_features for _, lin in ffn_first_linears(model)],
    }
    embeddings = [m.word_embeddings.embedding_dim for m in model.modules()
                  if _is_text_embeddings(m)]
    if embeddings:
        sizes["embedding_size"] = embeddings[0]
    return sizes


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def update_config(model: nn.Module, attentions: list[tuple[str, nn.Module, HeadLayout]]) -> None:
    """Write the pruned sizes into ``model.config``; see the module docstring."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    sizes = layer_sizes(model, attentions)
    if hasattr(config, "hidden_size"):
        config.hidden_size = sizes["hidden_size"]
    heads = _uniform(sizes["num_attention_heads"])
    if heads is not None and hasattr(config, "num_attention_heads"):
        config.num_attention_heads = heads
    ffn = _uniform(sizes["intermediate_size"])
    if ffn is not None:
        for attr in ("intermediate_size", "hidden_dim"):  # DistilBERT: hidden_dim
            if hasattr(config, attr) and attr not in getattr(config, "attribute_map", {}):
                setattr(config, attr, ffn)
                break
    if "embedding_size" in sizes and getattr(config, "embedding_size", None) is not None:
        config.embedding_size = sizes["embedding_size"]
    head_dim = _uniform(sizes["head_dim"])
    if heads and head_dim and sizes["hidden_size"] // heads != head_dim:
        config.head_dim = head_dim  # read by ViT/DeiT and q_proj-style encoders
    if hasattr(config, "surgery_layer_sizes"):
        del config.surgery_layer_sizes
    if not rebuilds(model):
        config.surgery_layer_sizes = sizes


def rebuilds(model: nn.Module) -> bool:
    """Whether ``type(model)(model.config)`` has the model's parameter shapes (so that
    ``save_pretrained`` / ``from_pretrained`` round-trip). Built on the meta device."""
    try:
        with torch.device("meta"):
            fresh = type(model)(copy.deepcopy(model.config))
    except Exception:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    return mine == theirs
