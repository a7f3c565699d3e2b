"""Compensation: refit the layers that read a cut group, by least squares, with no labels.

When channels ``R`` of a group are removed and ``K`` kept, a layer reading the group loses
``W_R x_R``. The best linear stand-in from what is left is the regression of the removed
channels on the kept ones over the calibration data,

    x_R ~ A x_K + c,   A = Cov(R, K) Cov(K, K)^-1,   c = mean(R) - A mean(K),

so the reader's weights become ``W_K + W_R A`` and its bias gains ``W_R c`` (summed over the
kernel for a convolution): exactly the least-squares refit of the layer's output from its kept
inputs for a linear layer, and the per-position version of it for a convolution. A reader
without a bias has nowhere to put ``W_R c``: when a BatchNorm follows it, the re-estimated
running mean takes the shift; otherwise (a decoder's ``o_proj`` and ``down_proj``) the fit is
the regression through the origin, ``A = E[x_R x_K^T] E[x_K x_K^T]^-1`` from the uncentred
second moments, or every such layer would leave the removed channels' mean contribution out
of the residual stream (SmolLM2-135M with half its decoder layers' parameters removed:
perplexity 197 with the centred fit, 72 with this one). The moments are the ones calibration
already collected for MI (each relation is one reader's input), so compensation costs one
small solve per reader.

It changes the weights of kept positions, so it runs on the model copy before slicing and the
plan records that it was applied (``plan.extra["compensated"]``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from surgery.graph.groups import Coupling, Relation
from surgery.stats.calibration import Calibration


def transposed_linear(module: torch.nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ W + b`` with ``W`` stored ``[in, out]``,
    recognised by its ``nx``/``nf`` attributes matching the weight."""
    w = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.ndim == 2
            and (getattr(module, "nx", None), getattr(module, "nf", None)) == tuple(w.shape))


def reader_weight(module: torch.nn.Module) -> torch.Tensor:
    """A reader's weight laid out ``[out, in, *kernel]`` (a view: writing it writes the
    parameter)."""
    return module.weight.t() if transposed_linear(module) else module.weight


def weighted_reader(gm: fx.GraphModule, rel: Relation
                    ) -> tuple[str | None, torch.nn.Module | None]:
    """The conv/linear module that reads a relation's group: its ``reader`` inside a leaf, or
    the module its layer node calls (None, None for functional readers). Linear layers stored
    transposed count (:func:`transposed_linear`; :func:`reader_weight` lays them out)."""
    if rel.reader is not None:
        name = rel.reader
    else:
        node = _layer_node(gm, rel)
        if node.op != "call_module":
            return None, None
        name = node.target
    module = gm.get_submodule(name)
    if isinstance(module, torch.nn.Linear) or transposed_linear(module):
        return name, module
    if isinstance(module, torch.nn.modules.conv._ConvNd) and module.groups == 1:
        return name, module
    return None, None


def _batchnorm_follows(gm: fx.GraphModule, rel: Relation) -> bool:
    """Whether the relation's layer writes straight into a BatchNorm (whose re-estimated mean
    absorbs a shift of its input)."""
    if rel.reader is not None:
        return False
    return any(u.op == "call_module" and isinstance(gm.get_submodule(u.target),
                                                    torch.nn.modules.batchnorm._BatchNorm)
               for u in _layer_node(gm, rel).users)


def _layer_node(gm: fx.GraphModule, rel: Relation) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == rel.layer)


@dataclass
class Refit:
    """What compensation adds to one reader for one cut group: ``weight_delta`` (out, kept,
    *kernel) to the weight's kept input positions ``positions`` (dim 1), ``bias_delta`` to the
    bias, for the cut of group ``group``. Computed from the dense weights; applied to the copy
    about to be sliced."""

    group: int
    module: str
    positions: np.ndarray
    weight_delta: torch.Tensor
    bias_delta: torch.Tensor | None


def refits(model: torch.nn.Module, coupling: Coupling, calibration: Calibration,
           kept: dict[int, np.ndarray], ridge: float = 1e-2) -> list[Refit]:
    """The least-squares refit of every reader of a cut group whose statistics ``calibration``
    holds (all of them, or one stage's), from ``model``'s dense weights."""
    gm = coupling.capture.graph_module
    out = []
    for i, sums in calibration.sums.items():
        rel = coupling.relations[i]
        group = coupling.groups[rel.group]
        feats = calibration.x_features[i]
        if not group.prunable or rel.group not in kept or feats.average_atoms:
            continue
        name, _ = weighted_reader(gm, rel)
        if name is None:
            continue
        keep_mask = np.isin(feats.position_atoms, kept[rel.group])
        if keep_mask.all() or not keep_mask.any():
            continue
        module = model.get_submodule(name)
        if module.bias is not None or _batchnorm_follows(gm, rel):  # an intercept fit
            cov, _, _ = sums.blocks()
            mean = sums.mean()[:sums.dx]
        else:  # no bias to take an intercept: the least-squares fit through the origin
            cov = sums.gram()[:sums.dx, :sums.dx] / max(sums.n, 1)
        k_cols = torch.as_tensor(np.nonzero(keep_mask)[0], device=cov.device)
        r_cols = torch.as_tensor(np.nonzero(~keep_mask)[0], device=cov.device)
        s_kk = cov.index_select(0, k_cols).index_select(1, k_cols)
        s_rk = cov.index_select(0, r_cols).index_select(1, k_cols)
        s_kk = s_kk + ridge * torch.diagonal(s_kk).mean().clamp_min(1e-12) * torch.eye(
            len(k_cols), dtype=cov.dtype, device=cov.device)
        a = torch.linalg.solve(s_kk, s_rk.T).T  # (R, K)
        w = reader_weight(module).detach()
        r_pos = torch.as_tensor(feats.positions[~keep_mask], device=w.device)
        w_r = w.index_select(1, r_pos).double()  # (out, R, *kernel)
        delta = torch.einsum("or...,rk->ok...", w_r, a.to(w.device)).to(w.dtype)
        shift = None
        if module.bias is not None:  # else a following BatchNorm's re-estimated mean absorbs it
            c = mean[r_cols] - a @ mean[k_cols]
            shift = torch.einsum("or...,r->o", w_r, c.to(w.device)).to(w.dtype)
        out.append(Refit(rel.group, name, feats.positions[keep_mask], delta, shift))
    return out


def apply_refits(model: torch.nn.Module, found: list[Refit]) -> list[str]:
    """Add the refits to ``model``'s weights in place; the names of the layers refitted."""
    with torch.no_grad():
        for refit in found:
            module = model.get_submodule(refit.module)
            w = reader_weight(module)
            w.index_add_(1, torch.as_tensor(refit.positions, device=w.device),
                         refit.weight_delta.to(w.device))
            if refit.bias_delta is not None:
                module.bias.add_(refit.bias_delta.to(w.device))
    return [r.module for r in found]


def compensate(model: torch.nn.Module, coupling: Coupling, calibration: Calibration,
               kept: dict[int, np.ndarray], ridge: float = 1e-2) -> list[str]:
    """Fold the removed channels' linear reconstruction into every reader of ``model`` (the
    copy about to be sliced, same parameter names as the traced model), in place. Returns the
    names of the layers refitted."""
    return apply_refits(model, refits(model, coupling, calibration, kept, ridge))
