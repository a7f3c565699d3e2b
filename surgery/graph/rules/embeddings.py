"""The rule of an embeddings module kept whole as an fx leaf (token, position and type tables,
patch convolutions, class tokens, learned position tables): every table's width is one
residual-stream channel. Used by the BERT and ViT plugins; :mod:`surgery.graph.rules.leaves`
re-exports it next to the attention rule.
"""

from __future__ import annotations

import numpy as np
import torch.fx as fx
import torch.nn as nn

from surgery.graph.propagate import Propagation, Track

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def embeddings_rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    """An embeddings leaf: the sum (or concatenation along tokens) of tables whose width is the
    model's hidden size, optionally normalised. Every such width is one residual channel:
    ``nn.Embedding`` columns, patch-convolution output channels, the last dim of directly held
    parameters (class/distillation tokens, learned position tables), norm parameters."""
    out_shape = prop.shape(node)
    if out_shape is None:
        prop.opaque_op(node, f"embeddings {node.target} without shapes")
        return
    width = out_shape[-1]
    nd = len(out_shape)
    joined: list[np.ndarray] = []
    prefix = node.target
    for name, sub in module.named_modules():
        full = f"{prefix}.{name}" if name else prefix
        if isinstance(sub, nn.Embedding) and sub.embedding_dim == width:
            joined.append(prop.param(f"{full}.weight", 1))
        elif isinstance(sub, _NORMS) and getattr(sub, "weight", None) is not None \
                and sub.weight.shape[0] == width:
            joined.extend(prop.param(f"{full}.{p}", 0) for p in ("weight", "bias")
                          if getattr(sub, p, None) is not None)
        elif isinstance(sub, nn.modules.conv._ConvNd) and sub.out_channels == width:
            rows = prop.param(f"{full}.weight", 0)
            joined.append(rows)
            if sub.bias is not None:
                prop.union(prop.param(f"{full}.bias", 0), rows)
            pixels = next((a for a in node.all_input_nodes if prop.shape(a) is not None
                           and len(prop.shape(a)) == sub.weight.ndim), None)
            if pixels is not None and sub.groups == 1:
                cols = prop.channel_ids(pixels, 1, "input of a patch embedding")
                prop.union(cols, prop.param(f"{full}.weight", 1))
    for pname, p in module.named_parameters(recurse=False):
        if p.ndim and p.shape[-1] == width:
            joined.append(prop.param(f"{prefix}.{pname}", p.ndim - 1))
    if not joined:
        prop.opaque_op(node, f"embeddings {prefix} with no table of width {width}")
        return
    ids = joined[0]
    for other in joined[1:]:
        prop.union(other, ids)
    for arg in node.all_input_nodes:
        shape = prop.shape(arg)
        for t in prop.get(arg):
            if shape is not None and t.axes == (len(shape) - 1,) and shape[-1] == width:
                prop.union(t.ids, ids)  # inputs_embeds given directly
            else:
                prop.freeze(t.ids, f"input of embeddings {prefix}")
    prop.produces[node.name] = ids
    prop.mac_factors[node.name] = [ids]  # a patch convolution's MACs scale with the width
    prop.set(node, [Track((nd - 1,), ids)])


__all__ = ["embeddings_rule"]
