"""Norm gains: one scale per LayerNorm/RMSNorm that normalises across a cut hidden group.

A norm over the residual stream divides every token by its RMS (or standard deviation) over
all ``d`` dims; once dims are cut it divides by the RMS over the ``d'`` kept ones. Criteria
cut the quiet dims, so the kept dims hold more than their share of the energy, the divisor
grows and every output of the norm shrinks by the same factor on every token: a gain error
the readers' least-squares refit cannot see (it is fitted on the dense norm's outputs).

The fix is one scalar per norm, the least-squares fit, on the calibration batches, of the
dense norm's kept outputs by the cut norm's outputs on the same inputs (bias excluded):
``c = <y, y'> / <y', y'>``. On a timm ViT trained on Fashion-MNIST with 30% of its hidden
dims cut (no other kinds), accuracy rose 0.663 -> 0.718 for ``act_weight`` and 0.661 ->
0.688 for ``magnitude``; ``mi`` cuts dims of average energy, its gains are about 1 and its
accuracy stayed at 0.638.

The gains are measured on the dense model before anything is cut, with cut copies of its
norms, so they need neither the dense model after the cut nor a second copy of it.
"""

from __future__ import annotations

import copy
import functools
from typing import Any, Iterable

import torch

from surgery.stats.distributed import observe
from surgery.stats.norm_energy import norms_across


def cut_norms(model: torch.nn.Module, keep: dict[str, dict[int, list[int]]]
              ) -> dict[str, list[int]]:
    """The norms of ``model`` whose weight a plan cuts (``keep``: the plan's kept positions
    per parameter and dim), with their kept positions."""
    out = {}
    for name in norms_across(model, [(p, dim) for p, dims in keep.items() for dim in dims]):
        kept = keep[f"{name}.weight" if name else "weight"][0]
        if len(kept) < model.get_submodule(name).weight.shape[0]:
            out[name] = list(kept)
    return out


def _cut_copy(norm: torch.nn.Module, kept: torch.Tensor) -> torch.nn.Module:
    """A copy of ``norm`` over the kept positions only, as slicing the plan would leave it."""
    cut = copy.deepcopy(norm)
    width = norm.weight.shape[0]
    for pname in ("weight", "bias"):
        p = getattr(cut, pname, None)
        if isinstance(p, torch.nn.Parameter) and p.ndim == 1 and p.shape[0] == width:
            setattr(cut, pname, torch.nn.Parameter(p.detach()[kept].clone(),
                                                   requires_grad=p.requires_grad))
    if hasattr(cut, "normalized_shape"):
        cut.normalized_shape = (len(kept),)
    return cut


def _bias(norm: torch.nn.Module) -> torch.Tensor | float:
    b = getattr(norm, "bias", None)
    return b.detach().double() if isinstance(b, torch.Tensor) else 0.0


def _weight_form(norm: torch.nn.Module) -> str | None:
    """How the norm's output scales with its weight: ``"scale"`` (``x_hat * w``), ``"offset"``
    (Gemma's ``x_hat * (1 + w)``), or None when it is neither (then it is left alone).
    Found by running a copy with the weight at 0 and at -1: the output is the bias alone
    exactly when the effective scale is 0."""
    probe = copy.deepcopy(norm).float()
    x = torch.randn(3, probe.weight.shape[0], device=probe.weight.device)
    for form, value in (("scale", 0.0), ("offset", -1.0)):
        with torch.no_grad():
            probe.weight.fill_(value)
            out = probe(x).double()
        if torch.allclose(out, torch.zeros_like(out) + _bias(probe), atol=1e-6):
            return form
    return None


def norm_gains(model: torch.nn.Module, keep: dict[str, dict[int, list[int]]],
               calib_data: Iterable[Any], max_batches: int | None = None,
               distributed: bool = False) -> dict[str, float]:
    """The gain of every cut norm of ``model`` (dense: called before the cut), by name, from
    one forward pass over the calibration batches (sharded like calibration under
    ``torch.distributed``, sums all-reduced). Norms of a form :func:`_weight_form` does not
    know, or that saw no token, get no gain."""
    norms = {n: k for n, k in cut_norms(model, keep).items()
             if _weight_form(model.get_submodule(n)) is not None}
    if not norms:
        return {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    sums = torch.zeros(len(norms), 2, dtype=torch.float64, device=device)

    def fold(i: int, kept: torch.Tensor, cut: torch.nn.Module, module: torch.nn.Module,
             args: tuple) -> None:
        h = args[0]
        if h.shape[-1] != module.weight.shape[0]:
            return  # not normalising over this axis after all: no tokens counted
        beta = _bias(cut)
        # module.forward, not module(h): calling the module would run this hook again
        y = module.forward(h).double().index_select(-1, kept) - beta
        y_cut = cut(h.index_select(-1, kept)).double() - beta
        sums[i, 0] += (y * y_cut).sum()
        sums[i, 1] += (y_cut * y_cut).sum()

    hooks = {}
    for i, (name, kept) in enumerate(norms.items()):
        module = model.get_submodule(name)
        idx = torch.as_tensor(kept, device=module.weight.device)
        hooks[module] = functools.partial(fold, i, idx, _cut_copy(module, idx))
    observe(model, hooks, sums, calib_data, max_batches, distributed)
    return {name: float(num / den) for name, (num, den) in zip(norms, sums.tolist())
            if den > 0}


def apply_gains(model: torch.nn.Module, gains: dict[str, float]) -> None:
    """Scale each named (already cut) norm's effective weight by its gain, in place."""
    for name, c in gains.items():
        norm = model.get_submodule(name)
        with torch.no_grad():
            if _weight_form(norm) == "offset":
                norm.weight.copy_(c * (1 + norm.weight) - 1)
            else:
                norm.weight.mul_(c)
