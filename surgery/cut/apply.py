"""Apply a plan: slice parameters and buffers into smaller dense tensors, fix layer attributes.

Slicing is one ``index_select`` per (tensor, dim). Layer attributes that describe widths
(``in_channels``, ``num_features``, ``normalized_shape``, ``groups`` ...) are then recomputed
from the new weights by one fixer per torch.nn layer type; plugins fix what is specific to
an architecture (head counts, configs) through ``surgery_fix_module`` / ``surgery_fix_model``.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Callable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from surgery._core.batches import call
from surgery._core.modes import evaluating
from surgery.cut.plan import PruningPlan, fingerprint
from surgery.errors import CaptureError, PlanError, SurgeryError, VerificationError

Fixer = Callable[[nn.Module, dict[str, tuple[int, ...]]], None]
FIXERS: dict[type, Fixer] = {}
"""Width-attribute fixers by torch.nn layer type, filled by :func:`fixes` where each is written;
``fixer(module, old_shapes)`` recomputes the attributes from the sliced tensors."""


def fixes(*types: type) -> Callable[[Fixer], Fixer]:
    """Decorator: ``fixer`` recomputes the width attributes of these layer types (and their
    subclasses) after slicing."""

    def add(fixer: Fixer) -> Fixer:
        FIXERS.update(dict.fromkeys(types, fixer))
        return fixer

    return add


@fixes(nn.modules.conv._ConvNd)
def _conv(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    w_old = old.get("weight", tuple(m.weight.shape))
    out_per_group = w_old[0] // m.groups
    m.groups = m.weight.shape[0] // out_per_group if m.groups > 1 else 1
    m.out_channels = m.weight.shape[0]
    m.in_channels = m.weight.shape[1] * m.groups


@fixes(nn.Linear)
def _linear(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.out_features, m.in_features = m.weight.shape


@fixes(nn.modules.batchnorm._NormBase)
def _batch_norm(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    ref = m.weight if m.weight is not None else m.running_mean
    m.num_features = ref.shape[0]


@fixes(nn.LayerNorm)
def _layer_norm(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.normalized_shape = tuple(m.weight.shape)


@fixes(nn.GroupNorm)
def _group_norm(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    per_group = old["weight"][0] // m.num_groups
    m.num_channels = m.weight.shape[0]
    m.num_groups = m.num_channels // per_group


@fixes(nn.Embedding)
def _embedding(m: nn.Module, old: dict[str, tuple[int, ...]]) -> None:
    m.num_embeddings, m.embedding_dim = m.weight.shape


def _fixer(module: nn.Module) -> Callable | None:
    for cls in type(module).__mro__:
        if cls in FIXERS:
            return FIXERS[cls]
    return None


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str, str]:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name), module_name, attr


def check_plan(model: nn.Module, plan: PruningPlan) -> None:
    """Refuse a plan made for another model, before anything is touched."""
    actual = fingerprint(model)
    if actual != plan.fingerprint:
        state = model.state_dict()
        diff = ([k for k, shape in plan.shapes.items()
                 if k not in state or list(state[k].shape) != shape]
                + [k for k in state if k not in plan.shapes])[:3]
        what = diff or f"model class {type(model).__name__}"
        raise PlanError(
            f"this plan was made for a different model (fingerprint {plan.fingerprint}, model "
            f"has {actual}; first differences: {what}). Apply it to a fresh "
            f"copy of the model it was made for ({plan.model_class or 'see plan.model_class'})."
        )
    state = model.state_dict()
    for param, dims in plan.keep.items():
        if param not in state:
            raise PlanError(f"the plan slices {param!r}, which the model does not have.")
        for dim, kept in dims.items():
            ndim = state[param].ndim
            if not isinstance(dim, numbers.Integral) or not 0 <= dim < ndim:
                raise PlanError(f"the plan slices dim {dim!r} of {param!r}, which has {ndim} "
                                "dims; the plan is corrupt or for another model.")
            size = state[param].shape[dim]
            if not kept:
                raise PlanError(f"the plan keeps nothing of {param!r} dim {dim}; keep at least "
                                "one.")
            if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in kept):
                raise PlanError(f"the plan's kept positions of {param!r} dim {dim} must be "
                                "integers; the plan is corrupt.")
            bad = [i for i in kept if not 0 <= i < size]
            if bad:
                raise PlanError(f"the plan keeps index {bad[0]} of {param!r} dim {dim} "
                                f"(size {size}); the plan is corrupt or for another model.")
            if any(a >= b for a, b in zip(kept, kept[1:])):
                raise PlanError(f"the plan's kept positions of {param!r} dim {dim} must be "
                                "strictly increasing (each kept once, in order); the plan is "
                                "corrupt.")


def slice_model(model: nn.Module, plan: PruningPlan) -> nn.Module:
    """Slice ``model`` in place according to ``plan`` and fix every touched module."""
    old_shapes: dict[str, dict[str, tuple[int, ...]]] = {}
    touched: dict[str, nn.Module] = {}
    done: dict[int, tuple[Any, torch.Tensor]] = {}  # tied tensors stay tied when cut alike
    with torch.no_grad():
        for name, dims in plan.keep.items():
            owner, module_name, attr = _owner(model, name)
            tensor = getattr(owner, attr)
            old_shapes.setdefault(module_name, {})[attr] = tuple(tensor.shape)
            previous = done.get(id(tensor))
            if previous is not None and previous[0] == dims:
                replacement = previous[1]
            else:
                new = tensor.data
                for dim, kept in sorted(dims.items()):
                    index = torch.as_tensor(kept, dtype=torch.long, device=new.device)
                    new = new.index_select(dim, index)
                new = new.contiguous()
                replacement = (nn.Parameter(new, requires_grad=tensor.requires_grad)
                               if isinstance(tensor, nn.Parameter) else new)
                done[id(tensor)] = (dims, replacement)
            if isinstance(tensor, nn.Parameter):
                setattr(owner, attr, replacement)
            else:
                owner._buffers[attr] = replacement
            touched[module_name] = owner
    from surgery.plugins._manager import call_hook

    for module_name, module in touched.items():
        fix = _fixer(module)
        if fix is not None:
            fix(module, old_shapes[module_name])
        call_hook("surgery_fix_module", name=module_name, module=module, model=model)
    call_hook("surgery_fix_model", model=model)
    return model


def _shapes(value: Any) -> Any:
    """The structure of a model output with each tensor replaced by its shape."""
    return tree_map(lambda v: tuple(v.shape) if isinstance(v, torch.Tensor) else None, value)


def verify(dense_shapes: Any, pruned: nn.Module, example_inputs: Any) -> None:
    """Run the pruned model and compare its output shapes with the dense model's."""
    try:
        with evaluating(pruned), torch.no_grad():
            out = call(pruned, example_inputs)
    except Exception as exc:
        raise VerificationError(
            f"the pruned model fails on the example inputs: {type(exc).__name__}: {exc}. A layer "
            "attribute was probably left stale; a plugin's surgery_fix_module hook can fix it, "
            "or freeze that module with surgery_frozen_modules."
        ) from exc
    if _shapes(out) != dense_shapes:
        raise VerificationError(
            f"the pruned model's output shapes {_shapes(out)} differ from the dense model's "
            f"{dense_shapes}; an output layer was cut. Report this with the model class."
        )


def apply_plan(
    model: nn.Module, plan: PruningPlan, example_inputs: Any = None, *, inplace: bool = False
) -> nn.Module:
    """Return ``model`` pruned by ``plan`` (a copy unless ``inplace``), verified on
    ``example_inputs`` when given."""
    check_plan(model, plan)
    dense_shapes = None
    if example_inputs is not None:
        try:
            with evaluating(model), torch.no_grad():
                dense_shapes = _shapes(call(model, example_inputs))
        except Exception as exc:
            raise CaptureError(
                f"the unpruned {type(model).__name__} fails on example_inputs: "
                f"{type(exc).__name__}: {exc}. Pass one batch exactly as the model's forward "
                "takes it (tensor, tuple of positional inputs, or dict of keyword inputs)."
            ) from exc
    target = model if inplace else copy.deepcopy(model)
    try:
        slice_model(target, plan)
    except SurgeryError:
        raise
    except Exception as exc:
        raise PlanError(
            f"slicing {type(model).__name__} by the plan failed: {type(exc).__name__}: {exc}. "
            "Either the plan's kept positions do not fit this model's layers (re-create the "
            "plan) or a layer fix-up is wrong (report it with the model class)."
        ) from exc
    if example_inputs is not None:
        verify(dense_shapes, target, example_inputs)
    return target
