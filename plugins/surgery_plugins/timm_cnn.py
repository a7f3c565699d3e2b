"""CNN plugin: torchvision and timm convolutional networks.

timm keeps a registry of modules and functions that fx must not trace into (data-dependent
padding, fused norm+activation layers); we hand that registry to the tracer. Fused layers
such as ``BatchNormAct2d`` subclass their torch.nn base, so the base's channel rule applies.
"""

from __future__ import annotations

from typing import Callable

import torch

from surgery.hookspecs import hookimpl


def _is_timm(model: torch.nn.Module) -> bool:
    return any(type(m).__module__.startswith("timm.") for m in model.modules())


@hookimpl
def surgery_leaf_modules(model: torch.nn.Module) -> list[type]:
    if not _is_timm(model):
        return []
    from timm.layers import get_notrace_modules

    return list(get_notrace_modules())


@hookimpl
def surgery_autowrap_functions(model: torch.nn.Module) -> list[Callable]:
    if not _is_timm(model):
        return []
    from timm.layers import get_notrace_functions

    return list(get_notrace_functions())
