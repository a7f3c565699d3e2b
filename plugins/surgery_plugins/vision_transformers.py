"""Vision transformer plugin: timm ``VisionTransformer`` / DeiT and HF ``ViTModel`` / ``DeiTModel``.

timm. The fused ``Attention`` (``qkv`` rows laid out ``[3, heads, head_dim]``, reshaped with
the head count as a literal) is an fx leaf described by
:func:`surgery.graph.rules.leaves.attention_rule`; its output projection ``proj`` is inside, as
are an optional output norm and gate (per-head rows). Everything else traces: the patch
embedding convolution, ``cls_token`` / ``reg_token`` / ``pos_embed`` (parameters read with
``get_attr`` and added or concatenated: their last dim joins the residual stream), LayerScale,
the MLP (``fc1`` rows are the ``neuron`` atoms). After slicing, ``num_heads`` / ``attn_dim`` of
every attention and ``embed_dim`` / ``num_features`` / ``head_hidden_size`` of the model are
recomputed.

HF. ``ViTEmbeddings``/``DeiTEmbeddings`` (patch convolution, class and distillation tokens,
learned position table; their forward checks the image size in Python) are leaves described
by ``embeddings_rule``. Attention (``q_proj``/``o_proj`` layout), MLP and config are handled
by :mod:`surgery_plugins.bert`, which covers every HF encoder with those layouts; the config
gains ``head_dim`` when heads were cut but the hidden size was not, which HF ViT reads back, so
``save_pretrained`` / ``from_pretrained`` round-trip when sizes are uniform across layers.
"""

from __future__ import annotations

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
from surgery_plugins.transformers_common import (
    KindMap,
    ffn_first_linears,
    head_keys,
    is_module_of,
    transformer_kind_weights,
)

TIMM_LAYOUT = HeadLayout(qkv="qkv", out="proj", heads="num_heads", head_dim="head_dim",
                         products=("attn_dim",), per_head_rows=("norm", "gate"))

_TIMM_ATTENTION: set[type] = set()
_HF_EMBEDDINGS: set[type] = set()
"""Leaf types tracing found, for ``surgery_module_rules`` (not given the model); fix-ups
never read them (see :func:`timm_attention_modules`)."""


def _is_timm(model: nn.Module) -> bool:
    return is_module_of(model, ("timm.",))


def timm_attention_modules(model: nn.Module, consistent: bool = False
                           ) -> Iterator[tuple[str, nn.Module]]:
    """timm attention modules with a fused qkv and the standard attributes, recognised from
    the module alone (see :func:`surgery.graph.rules.leaves.matches`), so fix-ups work in a
    process that never traced the model; ``consistent``: only modules whose head count
    matches their weights."""
    for name, module in model.named_modules():
        if (type(module).__module__.startswith("timm.")
                and matches(module, TIMM_LAYOUT, sizes=consistent)
                and _plain_timm_attention(module)):
            yield name, module


def _plain_timm_attention(module: nn.Module) -> bool:
    """Variants with rotary embeddings, relative position tables or extra parameters of their
    own are left to fx (and stay unpruned if it cannot describe them)."""
    own = [n for n, _ in module.named_parameters(recurse=False)]
    known = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop"}
    return not own and all(n in known for n, _ in module.named_children())


def _is_hf_vision_embeddings(module: nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__.startswith("transformers.") and cls.__name__.endswith("Embeddings")
            and isinstance(getattr(module, "cls_token", None), nn.Parameter)
            and getattr(module, "patch_embeddings", None) is not None)


@hookimpl
def surgery_leaf_modules(model: nn.Module) -> list[type]:
    leaves: list[type] = []
    if _is_timm(model):
        for _, module in timm_attention_modules(model, consistent=True):
            _TIMM_ATTENTION.add(type(module))
            leaves.append(type(module))
    if is_module_of(model, ("transformers.",)):
        for module in model.modules():
            if _is_hf_vision_embeddings(module):
                _HF_EMBEDDINGS.add(type(module))
                leaves.append(type(module))
    return list(dict.fromkeys(leaves))


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    rules: dict[type, Callable] = {cls: attention_rule(TIMM_LAYOUT) for cls in _TIMM_ATTENTION}
    rules.update({cls: embeddings_rule for cls in _HF_EMBEDDINGS})
    return rules


@hookimpl
def surgery_kind_weights(model: nn.Module, kinds: list[str]) -> dict[str, float] | None:
    return transformer_kind_weights(kinds) if _is_timm(model) and "head" in kinds else None


@hookimpl
def surgery_group_kind(group: Any, model: nn.Module) -> str | None:
    if not _is_timm(model):
        return None
    kinds = KindMap()
    for name, _ in timm_attention_modules(model):
        kinds.head |= head_keys(name, TIMM_LAYOUT)
    if not kinds.head:
        return None
    kinds.neuron |= {(f"{name}.weight", 0) for name, _ in ffn_first_linears(model)}
    return kinds.kind(group.slices, model)


@hookimpl
def surgery_fix_model(model: nn.Module) -> None:
    if not _is_timm(model):
        return
    for _, module in timm_attention_modules(model):
        fix_attention(module, TIMM_LAYOUT)
    width = _timm_width(model)
    if width is None:
        return
    for attr in ("embed_dim", "num_features"):
        if isinstance(getattr(model, attr, None), int):
            setattr(model, attr, width)
    head = getattr(model, "head", None)
    if isinstance(getattr(model, "head_hidden_size", None), int):
        model.head_hidden_size = head.in_features if isinstance(head, nn.Linear) else width
    patch = getattr(model, "patch_embed", None)
    if patch is not None and isinstance(getattr(patch, "embed_dim", None), int):
        patch.embed_dim = width


def _timm_width(model: nn.Module) -> int | None:
    """The residual width of a timm ViT: the last dim of its position table or class token."""
    for attr in ("pos_embed", "cls_token"):
        p = getattr(model, attr, None)
        if isinstance(p, nn.Parameter):
            return int(p.shape[-1])
    norm = getattr(model, "norm", None)
    weight = getattr(norm, "weight", None)
    return int(weight.shape[0]) if weight is not None else None
