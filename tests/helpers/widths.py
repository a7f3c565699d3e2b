"""What a pruned transformer's width attributes and config *should* say, read from its weights
alone, next to what they do say.

Written independently of the plugins' fix-ups (which it checks): every module attribute named
in :data:`WIDTH_ATTRS` must have a rule here, so a width attribute nobody thought of fails the
check instead of slipping through. Used in fresh interpreters (``PYTHONPATH=tests``), where a
reloaded model must be right without anything having been traced.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

WIDTH_ATTRS = ("num_attention_heads", "n_heads", "num_heads", "attention_head_size",
               "head_dim", "all_head_size", "attn_dim", "dim", "hidden_size", "embed_dim",
               "num_features", "head_hidden_size", "in_features", "out_features",
               "normalized_shape", "embedding_dim", "in_channels", "out_channels")
"""Attribute names that hold a width a cut can change."""

HEADS = ("num_attention_heads", "n_heads", "num_heads")
HEAD_SIZE = ("attention_head_size", "head_dim")
PRODUCTS = ("all_head_size", "attn_dim")
FIRST_PROJECTION = ("query", "q_lin", "q", "q_proj", "qkv")


def _value(v: Any) -> Any:
    return tuple(v) if isinstance(v, (tuple, list)) else v


def _attention_expectations(module: nn.Module, head_size: int) -> dict[str, int]:
    name = next(n for n in FIRST_PROJECTION if isinstance(getattr(module, n, None), nn.Linear))
    first = getattr(module, name)
    rows = first.out_features // (3 if name == "qkv" else 1)
    out = {a: rows // head_size for a in HEADS}
    out.update({a: head_size for a in HEAD_SIZE})
    out.update({a: rows for a in PRODUCTS})
    out["dim"] = first.in_features  # DistilBERT: the input width
    return out


def _is_attention(module: nn.Module) -> bool:
    return (any(isinstance(getattr(module, a, None), int) for a in HEADS)
            and any(isinstance(getattr(module, n, None), nn.Linear) for n in FIRST_PROJECTION))


def _module_expectations(module: nn.Module, head_size: int) -> dict[str, Any]:
    """``{attribute: value the weights imply}`` for one module."""
    if isinstance(module, nn.Linear):
        return {"out_features": module.weight.shape[0], "in_features": module.weight.shape[1]}
    if isinstance(module, nn.LayerNorm):
        return {"normalized_shape": tuple(module.weight.shape)}
    if isinstance(module, nn.Embedding):
        return {"embedding_dim": module.weight.shape[1]}
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"out_channels": module.weight.shape[0],
                "in_channels": module.weight.shape[1] * module.groups}
    if _is_attention(module):
        return _attention_expectations(module, head_size)
    bias = getattr(module, "relative_attention_bias", None)
    if isinstance(bias, nn.Embedding):  # MPNet's encoder: one position bias column per head
        return {"n_heads": bias.embedding_dim}
    cls_token = getattr(module, "cls_token", None)
    if isinstance(cls_token, nn.Parameter) and hasattr(module, "blocks"):  # timm ViT
        width = cls_token.shape[-1]
        head = getattr(module, "head", None)
        return {"embed_dim": width, "num_features": width,
                "head_hidden_size": head.in_features if isinstance(head, nn.Linear) else width}
    return {}


def attribute_report(model: nn.Module, head_size: int) -> dict[str, tuple[Any, Any]]:
    """``{"module.attr": (actual, expected)}`` for every width attribute of ``model``;
    ``head_size`` is the dense head size (heads are cut whole, so it never changes).

    An attribute named in :data:`WIDTH_ATTRS` with no rule here is reported with the expected
    value ``"no rule"``, so it fails any comparison."""
    report = {}
    for name, module in model.named_modules():
        expected = _module_expectations(module, head_size)
        for attr in WIDTH_ATTRS:
            actual = getattr(module, attr, None) if attr in vars(module) else None
            if actual is None or isinstance(actual, bool):
                continue
            if isinstance(actual, (int, tuple, list)):
                report[f"{name}.{attr}"] = (_value(actual), expected.get(attr, "no rule"))
    return report


def _first_attention(model: nn.Module) -> nn.Module:
    return next(m for m in model.modules() if _is_attention(m))


def layer_sizes(model: nn.Module, head_size: int) -> dict[str, Any]:
    """Per-layer sizes the weights imply: heads and FFN widths per layer, hidden and
    embedding widths."""
    attentions = [m for m in model.modules() if _is_attention(m)]
    heads = [_attention_expectations(m, head_size)["num_attention_heads"] for m in attentions]
    ffn = []
    for module in model.modules():
        for child in ("intermediate", "ffn", "mlp"):
            sub = getattr(module, child, None)
            first = next((getattr(sub, n) for n in ("dense", "lin1", "fc1")
                          if isinstance(getattr(sub, n, None), nn.Linear)), None)
            if first is not None:
                ffn.append(first.out_features)
    sizes = {"hidden_size": _attention_expectations(attentions[0], head_size)["dim"],
             "num_attention_heads": heads, "head_dim": [head_size] * len(heads),
             "intermediate_size": ffn}
    words = [m.word_embeddings.embedding_dim for m in model.modules()
             if isinstance(getattr(m, "word_embeddings", None), nn.Embedding)]
    if words:
        sizes["embedding_size"] = words[0]
    return sizes


def config_report(model: nn.Module, head_size: int) -> dict[str, tuple[Any, Any]]:
    """``{"config.field": (actual, expected)}`` for a Hugging Face model's width fields.

    A size that differs across layers has no single config value: the scalar field holds the
    largest layer's and ``config.surgery_layer_sizes`` every layer's (checked whole)."""
    config = getattr(model, "config", None)
    if config is None:
        return {}
    sizes = layer_sizes(model, head_size)
    heads, ffn = max(sizes["num_attention_heads"]), max(sizes["intermediate_size"])
    report = {"config.hidden_size": (config.hidden_size, sizes["hidden_size"]),
              "config.num_attention_heads": (config.num_attention_heads, heads)}
    ffn_field = "hidden_dim" if hasattr(config, "hidden_dim") else "intermediate_size"
    report[f"config.{ffn_field}"] = (getattr(config, ffn_field), ffn)
    own_head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    report["config head size"] = (own_head_dim, head_size)
    if getattr(config, "embedding_size", None) is not None:
        report["config.embedding_size"] = (config.embedding_size, sizes["embedding_size"])
    uniform = all(len(set(v)) == 1 for v in sizes.values() if isinstance(v, list))
    recorded = getattr(config, "surgery_layer_sizes", None)
    if not uniform or recorded is not None:
        report["config.surgery_layer_sizes"] = (recorded, sizes)
    return report


__all__ = ["WIDTH_ATTRS", "attribute_report", "config_report", "layer_sizes"]
