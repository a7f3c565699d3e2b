"""Saving and restoring train/eval modes module by module.

``model.train(flag)`` sets every submodule to one mode, which would undo a user's choice to
keep, say, a frozen BatchNorm in eval mode inside a training model. Everything in surgery
that switches a model to eval for a forward pass restores each submodule's own flag.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


def training_modes(model: torch.nn.Module) -> list[tuple[torch.nn.Module, bool]]:
    """Every submodule with its current ``training`` flag."""
    return [(m, m.training) for m in model.modules()]


def restore_modes(modes: list[tuple[torch.nn.Module, bool]]) -> None:
    for module, training in modes:
        module.training = training


@contextlib.contextmanager
def evaluating(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode for the block, every submodule's own flag restored after."""
    modes = training_modes(model)
    model.eval()
    try:
        yield model
    finally:
        restore_modes(modes)
