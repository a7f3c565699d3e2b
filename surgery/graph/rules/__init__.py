"""Built-in channel rules for torch operators and torch.nn layers, registered as a plugin.

Each rule describes how channel ids flow through one op (see :mod:`surgery.graph.propagate`).
They are registered through ``surgery_module_rules`` and ``surgery_function_rules``, the same
hooks a third-party plugin uses to teach the engine a new layer: ``tracks`` (the shared
algebra), ``shapes`` (axis-moving ops), ``layers`` (layers with weights), ``attention``
(products of activations).
"""

from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from surgery.graph.propagate import Propagation
from surgery.graph.rules.attention import matmul_rule, sdpa_rule
from surgery.graph.rules.layers import (
    batch_norm_function,
    batch_norm_module,
    conv_function,
    conv_module,
    embedding_function,
    embedding_module,
    group_norm_function,
    group_norm_module,
    layer_norm_function,
    layer_norm_module,
    linear_function,
    linear_module,
)
from surgery.graph.rules.shapes import (
    cat_rule,
    expand_rule,
    getitem_rule,
    pad_rule,
    permute_rule,
    reduce_rule,
    reshape_as_rule,
    reshape_like_rule,
    split_rule,
    stack_rule,
    transpose_rule,
    unflatten_rule,
    view_rule,
)
from surgery.graph.rules.tracks import (
    add_rule,
    keep_leading_axes,
    no_channels,
    passthrough,
    pointwise,
)
from surgery.hookspecs import hookimpl

_POINTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Softmax,
    nn.LogSoftmax, nn.Tanhshrink,
)


_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d, nn.ZeroPad2d,
)


def _module_pointwise(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    pointwise(prop, node, [node.args[0]])


def _module_pool(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    keep_leading_axes(prop, node)


def _module_flatten(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    reshape_like_rule(prop, node)


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    rules: dict[type, Callable] = {
        nn.Conv1d: conv_module, nn.Conv2d: conv_module, nn.Conv3d: conv_module,
        nn.Linear: linear_module,
        nn.BatchNorm1d: batch_norm_module, nn.BatchNorm2d: batch_norm_module,
        nn.BatchNorm3d: batch_norm_module, nn.InstanceNorm1d: batch_norm_module,
        nn.InstanceNorm2d: batch_norm_module, nn.InstanceNorm3d: batch_norm_module,
        nn.LayerNorm: layer_norm_module, nn.GroupNorm: group_norm_module,
        nn.Embedding: embedding_module, nn.Flatten: _module_flatten,
    }
    rules.update({t: _module_pointwise for t in _POINTWISE_MODULES})
    rules.update({t: _module_pool for t in _POOL_MODULES})
    return rules


def _unary(prop: Propagation, node: fx.Node) -> None:
    pointwise(prop, node, [node.args[0]])


def _first_arg(prop: Propagation, node: fx.Node) -> None:
    passthrough(prop, node)


_POINTWISE_FUNCTIONS: list[Any] = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.maximum, torch.minimum,
    "Tensor.add", "Tensor.sub", "Tensor.mul", "Tensor.div", "Tensor.add_", "Tensor.mul_",
    "Tensor.sub_", "Tensor.div_", "Tensor.masked_fill", "Tensor.where",
]


_UNARY_FUNCTIONS: list[Any] = [
    F.relu, F.relu6, F.gelu, F.silu, F.sigmoid, F.tanh, F.hardswish, F.hardsigmoid,
    F.leaky_relu, F.elu, F.mish, F.softplus, F.dropout, F.hardtanh, F.softmax, F.log_softmax,
    torch.relu, torch.sigmoid, torch.tanh, torch.exp, torch.sqrt, torch.rsqrt, torch.abs,
    torch.softmax, torch.clamp, torch.erf, torch.pow, operator.neg, operator.pow,
    "Tensor.relu", "Tensor.sigmoid", "Tensor.tanh", "Tensor.exp", "Tensor.sqrt",
    "Tensor.rsqrt", "Tensor.pow", "Tensor.clamp", "Tensor.clamp_min", "Tensor.clamp_max",
    "Tensor.softmax", "Tensor.abs", "Tensor.neg", "Tensor.relu_", "Tensor.sigmoid_",
    "Tensor.erf",
]


_FIRST_ARG_FUNCTIONS: list[Any] = [
    "Tensor.to", "Tensor.type_as", "Tensor.float", "Tensor.half", "Tensor.bfloat16",
    "Tensor.contiguous", "Tensor.clone", "Tensor.detach", "Tensor.type", "Tensor.double",
]


_REDUCE_FUNCTIONS: list[Any] = [
    torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
    "Tensor.mean", "Tensor.sum", "Tensor.amax", "Tensor.amin", "Tensor.std", "Tensor.var",
    "Tensor.logsumexp", "Tensor.norm",
]


_NO_CHANNELS: list[Any] = [
    builtins.getattr, "Tensor.size", "Tensor.dim", "Tensor.numel", "Tensor.ndimension",
    torch._assert, operator.eq, operator.ne, operator.lt, operator.gt, operator.floordiv,
    math.sqrt,
]


@hookimpl
def surgery_function_rules() -> dict[Any, Callable]:
    rules: dict[Any, Callable] = {}
    rules.update({f: pointwise for f in _POINTWISE_FUNCTIONS})
    rules[operator.add] = add_rule
    rules.update({f: _unary for f in _UNARY_FUNCTIONS})
    rules.update({f: _first_arg for f in _FIRST_ARG_FUNCTIONS})
    rules.update({f: reduce_rule for f in _REDUCE_FUNCTIONS})
    rules.update({f: no_channels for f in _NO_CHANNELS})
    rules.update({
        F.conv1d: conv_function, F.conv2d: conv_function, F.conv3d: conv_function,
        F.linear: linear_function, F.batch_norm: batch_norm_function,
        F.layer_norm: layer_norm_function, F.group_norm: group_norm_function,
        F.embedding: embedding_function,
        torch.cat: cat_rule, torch.concat: cat_rule,
        torch.split: split_rule, torch.chunk: split_rule, torch.unbind: split_rule,
        "Tensor.split": split_rule, "Tensor.chunk": split_rule, "Tensor.unbind": split_rule,
        operator.getitem: getitem_rule,
        "Tensor.view": view_rule, "Tensor.reshape": view_rule, torch.reshape: view_rule,
        "Tensor.reshape_as": reshape_as_rule, "Tensor.view_as": reshape_as_rule,
        torch.stack: stack_rule, F.pad: pad_rule,
        torch.flatten: reshape_like_rule, "Tensor.flatten": reshape_like_rule,
        torch.squeeze: reshape_like_rule, "Tensor.squeeze": reshape_like_rule,
        torch.unsqueeze: reshape_like_rule, "Tensor.unsqueeze": reshape_like_rule,
        "Tensor.unflatten": unflatten_rule, torch.unflatten: unflatten_rule,
        "Tensor.permute": permute_rule, torch.permute: permute_rule,
        "Tensor.transpose": transpose_rule, torch.transpose: transpose_rule,
        "Tensor.t": transpose_rule, torch.t: transpose_rule,
        "Tensor.expand": expand_rule, "Tensor.expand_as": expand_rule,
        torch.matmul: matmul_rule, operator.matmul: matmul_rule, torch.bmm: matmul_rule,
        "Tensor.matmul": matmul_rule,
        F.scaled_dot_product_attention: sdpa_rule,
        F.adaptive_avg_pool2d: keep_leading_axes, F.adaptive_max_pool2d: keep_leading_axes,
        F.avg_pool2d: keep_leading_axes, F.max_pool2d: keep_leading_axes,
        F.adaptive_avg_pool1d: keep_leading_axes, F.avg_pool1d: keep_leading_axes,
        F.max_pool1d: keep_leading_axes, F.interpolate: keep_leading_axes,
    })
    return rules
