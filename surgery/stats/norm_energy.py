"""Each channel's share of the energy that the norms across a group divide by.

A LayerNorm/RMSNorm over a residual stream divides every token by its spread over all the
stream's channels. Cutting a channel that holds more than its share of that spread changes
the divisor token by token, by as much as the channel is loud on that token: an error that
neither a refit of the readers nor one gain per norm (:mod:`surgery.cut.norm_gain`) can undo.
Decoder LLMs have a few channels hundreds of times louder than the median (SmolLM2-135M's
dim 507 holds 120 times its share), ViTs have milder ones.
"""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np
import torch

from surgery.stats.distributed import observe


def normalises_last_axis(module: torch.nn.Module) -> bool:
    """LayerNorm and RMSNorm over one trailing axis (torch's, timm's, transformers' RMSNorm
    classes); not the channels-first ``LayerNorm2d``s, nor GroupNorm."""
    name = type(module).__name__
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 1 or "2d" in name.lower():
        return False
    if isinstance(module, (torch.nn.LayerNorm, torch.nn.RMSNorm)):
        return len(module.normalized_shape) == 1
    return name.endswith("RMSNorm")


def norms_across(model: torch.nn.Module, params: Iterable[tuple[str, int]]) -> list[str]:
    """The norms (by module name) whose weight is cut along ``params`` (parameter, dim)."""
    out = []
    for param, dim in params:
        name = param.rpartition(".")[0]
        if dim == 0 and param.endswith("weight") and name not in out:
            module = model.get_submodule(name)
            if normalises_last_axis(module):
                out.append(name)
    return out


def energy_shares(model: torch.nn.Module, norms: list[str], calib_data: Iterable[Any],
                  max_batches: int | None = None, distributed: bool = False
                  ) -> np.ndarray | None:
    """Per channel, its mean share of a token's spread at the inputs of ``norms`` (centred
    for a LayerNorm, uncentred for an RMSNorm), times the width: 1 is a fair share. One
    forward pass (sharded like calibration, sums all-reduced); None if no norm saw a token."""
    if not norms:
        return None
    modules = [model.get_submodule(n) for n in norms]
    width = modules[0].weight.shape[0]
    sums = torch.zeros(width + 1, dtype=torch.float64,
                       device=modules[0].weight.device)  # shares, tokens

    def fold(module: torch.nn.Module, args: tuple) -> None:
        h = args[0].detach().double()
        if h.shape[-1] != width:
            return
        h = h.reshape(-1, width)
        if isinstance(module, torch.nn.LayerNorm):
            h = h - h.mean(-1, keepdim=True)
        power = h * h
        sums[:width] += (power / power.mean(-1, keepdim=True).clamp_min(1e-30)).sum(0)
        sums[width] += h.shape[0]

    observe(model, {m: fold for m in modules}, sums, calib_data, max_batches, distributed)
    if sums[width] == 0:
        return None
    return (sums[:width] / sums[width]).cpu().numpy()
