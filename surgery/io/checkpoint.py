"""Reading checkpoints: a state dict from safetensors or a torch pickle, checked against a model."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from surgery.errors import LoadError


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``),
    unwrapping ``{"state_dict": ...}`` / ``{"model": ...}`` and a DataParallel ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoadError(f"cannot read checkpoint {str(path)!r} as a state dict "
                            f"({type(exc).__name__}: {exc}).") from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"checkpoint {str(path)!r} is not a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        hint = " Pass --num-classes to match the checkpoint's classifier." if wrong else ""
        raise LoadError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {wrong[:3]}.{hint}"
        )
    model.load_state_dict(state)
