"""Channel rules for the layers with weights and per-channel parameters: convolutions,
linear layers, BatchNorm/LayerNorm/GroupNorm, embeddings (modules and their functional forms).

A layer with weights *consumes* the channels it reads (a relation scoring and compensation use)
and *produces* new ones from its weight's rows.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgery.graph.propagate import Consume, Propagation, Track
from surgery.graph.rules.registry import BUILTIN
from surgery.graph.rules.tracks import node_args, param_ids, pin_size_reads


def conv(
    prop: Propagation,
    node: fx.Node,
    x: Any,
    w_out: np.ndarray,
    w_in: np.ndarray | None,
    biases: list[np.ndarray],
    groups: int,
) -> None:
    """Convolution: output channels are the weight's dim 0; inputs meet dim 1. A grouped conv
    couples each input group with its output group, so it loses whole groups (a depthwise
    conv: channel i in with channel i out)."""
    in_ids = prop.channel_ids(x, 1, "input of a conv")
    for b in biases:
        prop.union(b, w_out)
    if groups == 1:
        if w_in is not None:
            prop.union(in_ids, w_in)
        prop.mac_factors[node.name] = [w_out, in_ids]
    else:
        ipg, opg = len(in_ids) // groups, len(w_out) // groups
        for j in range(groups):
            block = np.concatenate([in_ids[j * ipg:(j + 1) * ipg], w_out[j * opg:(j + 1) * opg]])
            prop.union(block, block[:1])
        prop.mac_factors[node.name] = [w_out]
    prop.consumes.append(Consume(node.name, x.name, Track((1,), in_ids)))
    prop.produces[node.name] = w_out
    prop.set(node, [Track((1,), w_out)])


@BUILTIN.module(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    name = node.target
    biases = [prop.param(f"{name}.bias", 0)] if module.bias is not None else []
    w_in = prop.param(f"{name}.weight", 1) if module.groups == 1 else None
    conv(prop, node, node.args[0], prop.param(f"{name}.weight", 0), w_in, biases, module.groups)


@BUILTIN.function(F.conv1d, F.conv2d, F.conv3d)
def conv_function(prop: Propagation, node: fx.Node) -> None:
    x, w, b, _, _, _, groups = node_args(
        node, ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    )
    groups = groups or 1
    w_out = param_ids(prop, w, 0)
    if w_out is None:
        prop.opaque_op(node, "conv with a computed weight")
        return
    if not isinstance(groups, int):  # groups=x.shape[1]: the axis it reads is pinned
        pin_size_reads(prop, groups, "its size fixes a conv's groups")
        groups = prop.shape(x)[1] // prop.shape(w)[1]
    elif groups > 1:  # a literal group count (F.conv2d(x, w, groups=self.channels)) stays
        prop.freeze(w_out, "conv with a literal group count")
        prop.freeze(prop.channel_ids(x, 1, "input of a conv"), "conv with a literal group count")
    b_ids = param_ids(prop, b, 0)
    conv(prop, node, x, w_out, param_ids(prop, w, 1) if groups == 1 else None,
         [b_ids] if b_ids is not None else [], groups)


def linear(prop: Propagation, node: fx.Node, x: Any, w_out: np.ndarray, w_in: np.ndarray,
           biases: list[np.ndarray]) -> None:
    """Linear: reads the last axis, writes the weight's dim 0 there; other axes pass."""
    in_ids = prop.channel_ids(x, -1, "input of a linear layer")
    prop.union(in_ids, w_in)
    for b in biases:
        prop.union(b, w_out)
    nd = len(prop.shape(x))
    keep = [t for t in prop.get(x) if t.axes != (nd - 1,)]
    prop.consumes.append(Consume(node.name, x.name, Track((nd - 1,), in_ids)))
    prop.produces[node.name] = w_out
    prop.mac_factors[node.name] = [w_out, in_ids]
    prop.set(node, keep + [Track((nd - 1,), w_out)])


@BUILTIN.module(nn.Linear)
def linear_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    name = node.target
    biases = [prop.param(f"{name}.bias", 0)] if module.bias is not None else []
    linear(prop, node, node.args[0], prop.param(f"{name}.weight", 0),
           prop.param(f"{name}.weight", 1), biases)


@BUILTIN.function(F.linear)
def linear_function(prop: Propagation, node: fx.Node) -> None:
    x, w, b = node_args(node, ("input", "weight", "bias"))
    w_out, w_in = param_ids(prop, w, 0), param_ids(prop, w, 1)
    if w_out is None or w_in is None:
        prop.opaque_op(node, "linear with a computed weight")
        return
    b_ids = param_ids(prop, b, 0)
    linear(prop, node, x, w_out, w_in, [b_ids] if b_ids is not None else [])


def per_channel(prop: Propagation, node: fx.Node, x: Any, axis: int,
                params: list[np.ndarray]) -> None:
    """Norm-like layers with one parameter entry per channel on ``axis``."""
    if params:
        ids = prop.channel_ids(x, axis, "normalised input")
        for p in params:
            prop.union(p, ids)
    prop.set(node, list(prop.get(x)))


@BUILTIN.module(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d,
                nn.InstanceNorm2d, nn.InstanceNorm3d)
def batch_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    names = [n for n in ("weight", "bias", "running_mean", "running_var")
             if getattr(module, n, None) is not None]
    per_channel(prop, node, node.args[0], 1, [prop.param(f"{node.target}.{n}", 0) for n in names])


@BUILTIN.function(F.batch_norm)
def batch_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, rm, rv, w, b = node_args(node, ("input", "running_mean", "running_var", "weight", "bias"))
    ids = [i for i in (param_ids(prop, a, 0) for a in (rm, rv, w, b)) if i is not None]
    per_channel(prop, node, x, 1, ids)


@BUILTIN.module(nn.LayerNorm)
def layer_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    params = [prop.param(f"{node.target}.{n}", 0) for n in ("weight", "bias")
              if getattr(module, n, None) is not None]
    _layer_norm(prop, node, node.args[0], len(module.normalized_shape), params)


@BUILTIN.function(F.layer_norm)
def layer_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, shape, w, b = node_args(node, ("input", "normalized_shape", "weight", "bias"))
    params = [i for i in (param_ids(prop, a, 0) for a in (w, b)) if i is not None]
    _layer_norm(prop, node, x, len(shape), params)


def _layer_norm(prop: Propagation, node: fx.Node, x: Any, k: int, params: list[np.ndarray]) -> None:
    if k != 1:
        prop.opaque_op(node, "layer_norm over several axes")
        return
    per_channel(prop, node, x, -1, params)


def group_norm(prop: Propagation, node: fx.Node, x: Any, groups: int,
               params: list[np.ndarray]) -> None:
    """GroupNorm: statistics are per group, so a group's channels go together."""
    ids = prop.channel_ids(x, 1, "input of group norm")
    per = len(ids) // groups
    for j in range(groups):
        prop.union(ids[j * per:(j + 1) * per], ids[j * per])
    per_channel(prop, node, x, 1, params)


@BUILTIN.module(nn.GroupNorm)
def group_norm_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    params = [prop.param(f"{node.target}.{n}", 0) for n in ("weight", "bias")
              if getattr(module, n, None) is not None]
    group_norm(prop, node, node.args[0], module.num_groups, params)


@BUILTIN.function(F.group_norm)
def group_norm_function(prop: Propagation, node: fx.Node) -> None:
    x, groups, w, b = node_args(node, ("input", "num_groups", "weight", "bias"))
    params = [i for i in (param_ids(prop, a, 0) for a in (w, b)) if i is not None]
    group_norm(prop, node, x, groups, params)


def embedding(prop: Propagation, node: fx.Node, dim_ids: np.ndarray) -> None:
    nd = len(prop.shape(node))
    prop.produces[node.name] = dim_ids
    prop.set(node, [Track((nd - 1,), dim_ids)])


@BUILTIN.module(nn.Embedding)
def embedding_module(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    embedding(prop, node, prop.param(f"{node.target}.weight", 1))


@BUILTIN.function(F.embedding)
def embedding_function(prop: Propagation, node: fx.Node) -> None:
    _, w = node_args(node, ("input", "weight"))
    ids = param_ids(prop, w, 1)
    if ids is None:
        prop.opaque_op(node, "embedding with a computed weight")
        return
    embedding(prop, node, ids)
