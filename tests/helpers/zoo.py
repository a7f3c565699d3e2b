"""The model zoo of the engine tests and a cache of traced couplings.

Models are randomly initialised (no hub access) under a fixed seed, put in eval mode, and
their BatchNorms get random statistics (see :func:`helpers.models.randomize_batchnorm`).
Tracing and grouping a timm model takes a second or so, so each (model, coupling) pair is built
once per session; tests must not modify the cached model (``apply_plan`` copies it by
default, which is itself checked by ``cut/test_apply``), and tests that need to mutate build a
fresh one.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from helpers.models import MLP, SmallCNN, randomize_batchnorm


def _timm(name: str) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import timm

        return timm.create_model(name, pretrained=False)

    return make


def _tv_resnet18() -> torch.nn.Module:
    import torchvision

    return torchvision.models.resnet18()


IMAGE = (2, 3, 32, 32)

# name -> (factory, example input shape)
ZOO: dict[str, tuple[Callable[[], torch.nn.Module], tuple[int, ...]]] = {
    "mlp": (MLP, (2, 32)),
    "small_cnn": (SmallCNN, (2, 3, 16, 16)),
    "tv_resnet18": (_tv_resnet18, IMAGE),
    "resnet50d": (_timm("resnet50d"), IMAGE),
    "mobilenetv3_large_100": (_timm("mobilenetv3_large_100"), IMAGE),
    "efficientnet_b0": (_timm("efficientnet_b0"), IMAGE),
    "densenet121": (_timm("densenet121"), IMAGE),
    "convnext_atto": (_timm("convnext_atto"), IMAGE),
    "regnety_008": (_timm("regnety_008"), IMAGE),
}
ALL_MODELS = list(ZOO)


def make_model(name: str, seed: int = 0) -> torch.nn.Module:
    """A fresh instance of zoo model ``name``: same seed, same weights, eval mode."""
    factory, _ = ZOO[name]
    torch.manual_seed(seed)
    model = factory()
    randomize_batchnorm(model, seed)
    return model.eval()


def make_input(name: str, seed: int = 1) -> torch.Tensor:
    _, shape = ZOO[name]
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Case:
    """A zoo model, its example input and its coupling (traced once per session)."""

    name: str
    model: torch.nn.Module
    x: torch.Tensor
    coupling: object
    snapshot: dict[str, torch.Tensor]  # the model's state right after it was built


_CASES: dict[str, Case] = {}
_PRUNED: dict[str, tuple[object, torch.nn.Module]] = {}

HALF_SEED = 0


def get_case(name: str) -> Case:
    if name not in _CASES:
        from surgery.graph.capture import trace
        from surgery.graph.groups import find_groups

        model, x = make_model(name), make_input(name)
        snapshot = state_snapshot(model)
        _CASES[name] = Case(name, model, x, find_groups(trace(model, x)), snapshot)
    return _CASES[name]


def get_pruned(name: str):
    """``(plan, pruned)``: the case's model pruned by ``keep_random_half(seed=HALF_SEED)`` with
    ``apply_plan`` (verified on the example input); built once per session."""
    if name not in _PRUNED:
        from surgery.cut.apply import apply_plan

        case = get_case(name)
        plan = plan_for(case.coupling, keep_random_half(case.coupling, seed=HALF_SEED))
        _PRUNED[name] = (plan, apply_plan(case.model, plan, case.x))
    return _PRUNED[name]


def keep_all(coupling) -> dict[int, np.ndarray]:
    return {g.id: np.arange(g.atoms) for g in coupling.prunable}


def keep_random_half(coupling, seed: int = 0) -> dict[int, np.ndarray]:
    """For every prunable group, a random half of its atoms (at least one)."""
    rng = np.random.default_rng(seed)
    return {
        g.id: np.sort(rng.choice(g.atoms, max(1, g.atoms // 2), replace=False))
        for g in coupling.prunable
    }


def plan_for(coupling, kept: dict[int, np.ndarray]):
    from surgery.cut.plan import build_plan

    return build_plan(coupling, kept, criterion="test", target="output", budget={})


def state_snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_state_equal(model: torch.nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert list(state) == list(snapshot), "parameter/buffer names changed"
    for k, v in snapshot.items():
        assert state[k].shape == v.shape, f"{k}: shape {tuple(v.shape)} -> {tuple(state[k].shape)}"
        assert torch.equal(state[k], v), f"{k} changed value"


def digest(coupling) -> str:
    """Everything observable about the groups, hashed."""
    rows = []
    for g in coupling.groups:
        rows.append([
            g.id, g.name, g.kind, g.atoms, g.prunable, g.reason,
            [[k[0], k[1], [a.tolist() for a in v]] for k, v in sorted(g.slices.items())],
        ])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()
