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
MPNet's shared relative-position bias head count, and the config (:mod:`surgery_plugins.hf_config`):
``hidden_size``, ``num_attention_heads``, ``intermediate_size`` (DistilBERT's
``dim``/``n_heads``/``hidden_dim`` through the config's attribute map), ELECTRA's
``embedding_size``, ``head_dim`` where the head size no longer equals
``hidden_size // num_attention_heads``. Everything is found from the model alone, so a pruned
model loaded by :func:`surgery.io.load` in a fresh process gets the same values. When the
config cannot describe the pruned model (sizes differ across layers, or the architecture
derives the head size from the hidden size), ``config.surgery_layer_sizes`` records the
per-layer sizes and ``from_pretrained`` on that config fails loudly on shape mismatch;
:func:`surgery.io.load` rebuilds such models from the base config and the plan. Under
``uniform_widths`` the ``surgery_config_limits`` hook keeps what the config cannot express
uncut (BERT-style configs: FFN neurons only; ViT, which reads ``head_dim``: heads and hidden
dims too).
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Iterator

import torch.nn as nn

from surgery.graph.rules.leaves import (
    HeadLayout,
    attention_rule,
    embeddings_rule,
    fix_attention,
    matches,
)
from surgery.hookspecs import hookimpl
from surgery_plugins.hf_config import (
    config_limits,
    is_text_embeddings,
    layer_sizes,
    rebuilds,
    update_config,
)
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
"""The leaf types tracing found, for ``surgery_module_rules`` (which is not given the model);
fix-ups never read them (see :func:`attention_modules`)."""


def _is_hf(model: nn.Module) -> bool:
    return is_module_of(model, ("transformers.",))


def attention_modules(model: nn.Module, consistent: bool = False
                      ) -> Iterator[tuple[str, nn.Module, HeadLayout]]:
    """Every self-attention module of a transformers model with a known layout, in order.

    Recognised from the module alone (children, attributes, projection shapes; see
    :func:`matches`), never from what tracing saw, so a pruned model loaded in a fresh
    process is fixed like the one that was pruned. ``consistent``: only modules whose head
    count matches their weights (what the channel rule needs; false between slicing and the
    fix-up)."""
    for name, module in model.named_modules():
        cls = type(module)
        if not cls.__module__.startswith("transformers.") or "Cross" in cls.__name__:
            continue
        layout = next((lay for lay in HF_LAYOUTS if matches(module, lay, sizes=consistent)),
                      None)
        if layout is not None:
            yield name, module, layout


@hookimpl
def surgery_leaf_modules(model: nn.Module) -> list[type]:
    if not _is_hf(model):
        return []
    leaves: list[type] = []
    for _, module, layout in attention_modules(model, consistent=True):
        _LAYOUT_OF.setdefault(type(module), layout)
        leaves.append(type(module))
    for module in model.modules():
        if is_text_embeddings(module):
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
def surgery_config_limits(model: nn.Module, groups: list[Any]) -> dict[int, str] | None:
    if not _is_hf(model) or getattr(model, "config", None) is None:
        return None
    attentions = list(attention_modules(model))
    return config_limits(model, groups, attentions) if attentions else None


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


__all__ = ["HF_LAYOUTS", "attention_modules", "layer_sizes", "update_config", "rebuilds"]
