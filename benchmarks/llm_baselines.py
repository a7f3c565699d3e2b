"""Structured LLM pruners surgery is compared against, re-implemented from their papers and
official code for a transformers 5 Llama (SmolLM2 here: 30 layers, 3 key-value groups of 3
query heads, FFN 1536).

Each is ``method(model, calib, share) -> model``: ``model`` a ``LlamaForCausalLM`` the
function may modify (pass a deepcopy), ``calib`` ``(windows, tokens)`` token ids, ``share``
the part of the decoder layers' parameters (``model.layers.*``) to remove. Hidden size is
kept; attention loses whole key-value groups (the unit under grouped-query attention, see
``_llama_surgery``) and the FFN whole channels, physically (smaller ``nn.Linear``), so the
result is really faster, runs forward and ``generate()`` with the KV cache.

- :func:`flap`: FLAP (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP ``prune_flap``, its defaults
  ``WIFV`` + ``AL-AM``): fluctuation metric, per-layer standardisation, one global threshold
  over layers and module types, mean-activation bias compensation.
- :func:`wanda_sp`: FLAP repo's ``prune_wanda_sp``: ``|W| * ||X_j||``, the same ratio in
  every layer, layer by layer on the pruned model's activations, no compensation.
- :func:`slimgpt`: SlimGPT (Ling et al., NeurIPS 2024), no public code: layer-wise OBS with
  the exact grouped inverse-Hessian error per head group, greedy, weights compensated;
  FFN columns in shrinking groups (Dynamic Group Size); logarithmically increasing layer
  ratio (Incremental Pruning Ratio), or ``schedule="uniform"``.
- :func:`torch_pruning_llm`: Torch-Pruning 1.6's ``examples/LLMs/prune_llm.py`` calls
  (``BasePruner``, group L2 magnitude, ``num_heads``, ``prune_num_heads``, no head dims),
  run layer by layer with the hidden size kept; :func:`torch_pruning_ffn` without heads.
- :func:`magnitude_unstructured`: zero the smallest ``|w|`` of every decoder linear layer
  (masks: a reference, not faster).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from _llama_surgery import (
    LayerInputs,
    Units,
    decoder_params,
    first_layer_inputs,
    keep_channels,
    keep_groups,
    layer_fixed_params,
    layers,
    linear_inputs,
    split_layer_budget,
)

Method = Callable[[nn.Module, torch.Tensor, float], nn.Module]

ATTN_OUT, FFN_OUT = "self_attn.o_proj", "mlp.down_proj"


class InputStats:
    """Running per-feature sums of a linear layer's inputs (float64): count, mean, second
    moments and, when asked, the Gram matrix ``X^T X`` (the OBS Hessian up to a factor)."""

    def __init__(self, gram: bool = False) -> None:
        self.gram = gram
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.xtx: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        """Add ``(tokens, features)`` inputs."""
        if self.sum is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float64)
            self.sumsq = torch.zeros_like(self.sum)
            if self.gram:
                self.xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        xd = x.double()
        self.n += x.shape[0]
        self.sum += xd.sum(0)
        self.sumsq += xd.pow(2).sum(0)
        if self.gram:  # products in float32 (fast), the sum over batches in float64
            xf = x.float()
            self.xtx += (xf.T @ xf).double()

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def variance(self) -> torch.Tensor:
        """Unbiased variance of every input feature over all calibration tokens."""
        return (self.sumsq - self.n * self.mean.pow(2)) / (self.n - 1)


def _layer_total(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in order."""
    return torch.topk(scores, k).indices.sort().values if k else scores.new_zeros(0).long()


# --- 1. FLAP -----------------------------------------------------------------------------

def flap(model: nn.Module, calib: torch.Tensor, share: float, batch: int = 8) -> nn.Module:
    """FLAP: remove the units whose input fluctuates least, compensate their mean.

    As FLAP's ``prune_flap`` with its defaults (metric ``WIFV``, structure ``AL-AM``):

    1. statistics come from one pass of the *dense* model (FLAP collects every layer's
       statistics before pruning any: its ``outs`` are the unpruned layer's outputs);
    2. per input channel ``j`` of ``o_proj`` and ``down_proj``: the fluctuation
       ``Var_tokens(X_j) * ||W[:, j]||^2``; attention's is squared, as the code does;
    3. scores standardised per layer and module type (mean/std over that layer's channels),
       an attention unit's score the mean of its channels' (FLAP: per head; here per
       key-value group, the unit that can go under GQA);
    4. one global ranking over all layers and both module types, each unit weighted by the
       parameters it owns (FLAP: ``512/3`` per head against 1 per channel; the same ratio
       for a group here), cut where the kept parameters hit ``1 - share``;
    5. ``o_proj``/``down_proj`` get a bias: the removed channels' mean contribution
       ``W[:, removed] @ mean(X_removed)`` (FLAP's model has the bias in every layer, and so
       do these; their parameters are counted and budgeted).

    A layer may lose all its groups (FLAP allows it): its attention becomes the bias alone
    (:class:`~_llama_surgery.EmptyAttention`); likewise a zero-channel FFN.
    """
    units = Units.of(model)
    stats = {(i, n): InputStats() for i in range(len(layers(model))) for n in (ATTN_OUT,
                                                                                FFN_OUT)}
    handles = [layer.get_submodule(name).register_forward_hook(
        lambda _m, args, _o, s=stats[i, name]: s.add(args[0].reshape(-1, args[0].shape[-1])))
        for i, layer in enumerate(layers(model)) for name in (ATTN_OUT, FFN_OUT)]
    try:
        with torch.no_grad():
            for ids in calib.split(batch):
                model.model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()

    def standardise(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / x.std()

    attn, ffn = [], []
    for i, layer in enumerate(layers(model)):
        w = layer.get_submodule(ATTN_OUT).weight.double()
        metric = (stats[i, ATTN_OUT].variance * w.pow(2).sum(0)).pow(2)
        attn.append(standardise(metric).view(units.groups, units.group_width).mean(1))
        w = layer.get_submodule(FFN_OUT).weight.double()
        ffn.append(standardise(stats[i, FFN_OUT].variance * w.pow(2).sum(0)))
    attn_s, ffn_s = torch.stack(attn), torch.stack(ffn)  # (layers, groups), (layers, ffn)

    scores = torch.cat([attn_s.flatten(), ffn_s.flatten()])
    cost = torch.cat([torch.full((attn_s.numel(),), float(units.group_params)),
                      torch.full((ffn_s.numel(),), float(units.channel_params))])
    n_layers = len(layers(model))
    fixed = sum(layer_fixed_params(layer) for layer in layers(model))
    added_bias = 2 * units.hidden * n_layers
    budget = (1 - share) * decoder_params(model) - fixed - added_bias
    order = torch.argsort(scores, descending=True)
    kept_cost = torch.cumsum(cost[order], 0)
    k = int(torch.argmin((kept_cost - budget).abs())) + 1
    if budget <= 0:
        k = 0
    keep = torch.zeros_like(scores, dtype=torch.bool)
    keep[order[:k]] = True
    keep_attn = keep[:attn_s.numel()].view_as(attn_s)
    keep_ffn = keep[attn_s.numel():].view_as(ffn_s)

    for i, layer in enumerate(layers(model)):
        groups = torch.nonzero(keep_attn[i]).flatten()
        gone = ~keep_attn[i].repeat_interleave(units.group_width)
        w = layer.get_submodule(ATTN_OUT).weight.double()
        bias = (w[:, gone] @ stats[i, ATTN_OUT].mean[gone]).float()
        keep_groups(layer, units, groups, o_bias=bias)
        channels = torch.nonzero(keep_ffn[i]).flatten()
        gone = ~keep_ffn[i]
        w = layer.get_submodule(FFN_OUT).weight.double()
        bias = (w[:, gone] @ stats[i, FFN_OUT].mean[gone]).float()
        keep_channels(layer, channels, down_bias=bias)
    return model


# --- 2. Wanda-sp -------------------------------------------------------------------------

def wanda_sp(model: nn.Module, calib: torch.Tensor, share: float) -> nn.Module:
    """Wanda-sp, the structured Wanda of FLAP's repository (``prune_wanda_sp``).

    Layer by layer, on the activations of the already pruned layers below (its ``inps`` are
    the pruned layer's outputs): per input channel ``j`` of ``o_proj``/``down_proj`` the
    Wanda score ``|W[:, j]| * ||X_j||_2`` averaged over output rows; a head's (here a
    key-value group's) score the sum over its channels; the lowest-scoring units removed at
    the same ratio in every layer, no compensation. With 3 groups a ratio is rounded to whole
    groups and the FFN channels make up the layer's parameter share
    (:func:`~_llama_surgery.split_layer_budget`).
    """
    units = Units.of(model)
    inputs = first_layer_inputs(model, calib)
    for layer in layers(model):
        stats = {n: InputStats() for n in (ATTN_OUT, FFN_OUT)}
        linear_inputs(layer, inputs, (ATTN_OUT, FFN_OUT), stats)
        g, c = split_layer_budget(share * _layer_total(layer), units, units.groups, units.ffn)
        norm = {n: (s.sumsq / inputs_windows(inputs)).sqrt() for n, s in stats.items()}
        w = layer.get_submodule(ATTN_OUT).weight.double().abs()
        score = (w * norm[ATTN_OUT]).mean(0).view(units.groups, units.group_width).sum(1)
        keep_groups(layer, units, _top(score, units.groups - g))
        w = layer.get_submodule(FFN_OUT).weight.double().abs()
        keep_channels(layer, _top((w * norm[FFN_OUT]).mean(0), units.ffn - c))
        inputs = inputs.run(layer)
    return model


def inputs_windows(inputs: LayerInputs) -> int:
    """Calibration windows (Wanda averages ``||X_j||^2`` over samples)."""
    return sum(h.shape[0] for h in inputs.hidden)


# --- 3. SlimGPT --------------------------------------------------------------------------

def layer_ratios(share: float, n_layers: int, schedule: str = "log") -> list[float]:
    """SlimGPT's Incremental Pruning Ratio: pruning error accumulates with depth, so early
    layers are pruned less. ``log``: ``r_i = r_last * ln(i + 1) / ln(L)`` (first layer
    untouched, rising logarithmically), ``r_last`` set so the mean is ``share`` (capped at
    1, the excess spread over the others); ``uniform``: ``share`` everywhere."""
    if schedule == "uniform":
        return [share] * n_layers
    if schedule != "log":
        raise ValueError(f"schedule is log or uniform, not {schedule!r}")
    shape = [math.log(i + 1) for i in range(n_layers)]
    scale = share * n_layers / sum(shape)
    ratios = [min(1.0, scale * s) for s in shape]
    for _ in range(n_layers):  # give what the cap cut off to the layers below the cap
        missing = share * n_layers - sum(ratios)
        free = [i for i, r in enumerate(ratios) if 0 < r < 1]
        if missing < 1e-9 or not free:
            break
        weight = sum(shape[i] for i in free)
        ratios = [min(1.0, r + missing * shape[i] / weight) if i in free else r
                  for i, r in enumerate(ratios)]
    return ratios


def _inverse_hessian(stats: InputStats, weight: torch.Tensor, damp: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H + damp * mean(diag H) I)^{-1}`` with ``H = X^T X`` and the weight (float64), dead
    inputs (never nonzero) handled as SparseGPT does."""
    h = stats.xtx.clone()
    w = weight.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=h.dtype)
    return torch.cholesky_inverse(torch.linalg.cholesky(h)), w


def _obs_error(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> float:
    """Output error of removing columns ``cols`` together with the optimal update of the rest:
    ``tr(W_S [H^-1]_SS^-1 W_S^T)`` (grouped OBS; one Cholesky of the block)."""
    chol = torch.linalg.cholesky(hinv[cols][:, cols])
    ws = w[:, cols]
    return float((ws.T * torch.cholesky_solve(ws.T, chol)).sum().detach())


def _obs_remove(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """Remove columns ``cols`` in place: ``W -= W_S [H^-1]_SS^-1 [H^-1]_S:`` (zeroes them,
    compensates all the others), and the inverse Hessian of the columns left."""
    chol = torch.linalg.cholesky(hinv[cols][:, cols])
    a = torch.cholesky_solve(hinv[cols], chol)  # [H^-1]_SS^-1 [H^-1]_S:
    w -= w[:, cols] @ a
    hinv -= hinv[:, cols] @ a
    w[:, cols] = 0
    hinv[cols] = 0
    hinv[:, cols] = 0


def _slim_attention(w: torch.Tensor, hinv: torch.Tensor, units: Units, remove: int
                    ) -> torch.Tensor:
    """Batched greedy head pruning: every step, the exact grouped-OBS error of each
    remaining key-value group (its ``q_per_group * head_dim`` ``o_proj`` columns), the
    cheapest removed and the rest compensated. Returns the kept groups."""
    left = list(range(units.groups))
    for _ in range(remove):
        cols = [torch.arange(g * units.group_width, (g + 1) * units.group_width) for g in left]
        errors = [_obs_error(w, hinv, c) for c in cols]
        best = min(range(len(left)), key=errors.__getitem__)
        _obs_remove(w, hinv, cols[best])
        left.pop(best)
    return torch.tensor(left, dtype=torch.long)


def _slim_ffn(w: torch.Tensor, hinv: torch.Tensor, remove: int, smallest: int = 8
              ) -> torch.Tensor:
    """FFN columns with Dynamic Group Size: per-column OBS error ``||W_j||^2 / [H^-1]_jj``,
    the lowest ones removed together (grouped OBS, exact within the group), the errors
    recomputed; each group half of what is still to remove (at least ``smallest``), so the
    first large groups are cheap and the last small ones precise. Returns kept columns."""
    alive = torch.ones(w.shape[1], dtype=torch.bool)
    while remove > 0:
        size = min(remove, max(smallest, math.ceil(remove / 2)))
        error = w.pow(2).sum(0) / torch.diag(hinv).clamp_min(1e-30)
        error[~alive] = math.inf
        cols = torch.topk(error, size, largest=False).indices
        _obs_remove(w, hinv, cols)
        alive[cols] = False
        remove -= size
    return torch.nonzero(alive).flatten()


def slimgpt(model: nn.Module, calib: torch.Tensor, share: float, schedule: str = "log",
            damp: float = 0.01) -> nn.Module:
    """SlimGPT: layer-wise Optimal Brain Surgeon on each layer's output projections.

    Layer by layer on the pruned model's activations (like SparseGPT): for ``o_proj``, then
    (inputs re-collected behind the pruned attention) ``down_proj``, ``H = X^T X`` (+1%
    mean-diagonal damping, as SparseGPT), then removal of whole column groups with the OBS
    update of the columns kept (:func:`_slim_attention`, :func:`_slim_ffn`); the q/k/v and
    gate/up rows of removed units are dropped. Each layer removes ``layer_ratios(share)[i]``
    of its parameters: groups rounded, channels making up the rest.
    """
    units = Units.of(model)
    inputs = first_layer_inputs(model, calib)
    ratios = layer_ratios(share, len(layers(model)), schedule)
    for i, layer in enumerate(layers(model)):
        g, c = split_layer_budget(ratios[i] * _layer_total(layer), units, units.groups,
                                  units.ffn)
        if g:
            stats = {ATTN_OUT: InputStats(gram=True)}
            linear_inputs(layer, inputs, (ATTN_OUT,), stats)
            hinv, w = _inverse_hessian(stats[ATTN_OUT], layer.get_submodule(ATTN_OUT).weight,
                                       damp)
            kept = _slim_attention(w, hinv, units, g)
            cols = (kept[:, None] * units.group_width
                    + torch.arange(units.group_width)[None]).flatten()
            keep_groups(layer, units, kept, o_weight=w[:, cols].float())
        if c:
            stats = {FFN_OUT: InputStats(gram=True)}
            linear_inputs(layer, inputs, (FFN_OUT,), stats)
            hinv, w = _inverse_hessian(stats[FFN_OUT], layer.get_submodule(FFN_OUT).weight,
                                       damp)
            kept = _slim_ffn(w, hinv, c)
            keep_channels(layer, kept, down_weight=w[:, kept].float())
        inputs = inputs.run(layer)
    return model


def slimgpt_uniform(model: nn.Module, calib: torch.Tensor, share: float) -> nn.Module:
    """SlimGPT with the same ratio in every layer (the paper's ablation of its schedule)."""
    return slimgpt(model, calib, share, schedule="uniform")


# --- 4. Torch-Pruning's LLM example ------------------------------------------------------

def torch_pruning_llm(model: nn.Module, calib: torch.Tensor, share: float,
                      heads: bool = True) -> nn.Module:
    """Torch-Pruning 1.6's ``examples/LLMs/prune_llm.py`` calls, decoder layer by layer.

    The calls: ``num_heads`` for q (query heads) and k/v (key-value heads),
    ``BasePruner(importance=GroupMagnitudeImportance(p=2, group_reduction="mean"),
    global_pruning=False, pruning_ratio=r, head_pruning_ratio=share, prune_num_heads=True,
    prune_head_dims=False, round_to=4)``, ``step(interactive=True)`` with ``g.prune()`` per
    group, then ``num_key_value_groups`` (query heads per k/v head) and the MLP width fixed
    as the example does. Deviations, each forced by this model or the brief:

    - run on each decoder layer rather than the whole model: with local pruning
      (``global_pruning=False``) and magnitude importance every group is ranked on its own
      weights, and a layer's groups are the same traced alone, so the choice is the same;
      traced whole, Torch-Pruning builds the model-wide hidden-size group in quadratic time
      (over 15 minutes per ``get_all_groups`` on this machine; the example calls it twice);
    - the hidden size is kept (the example cuts it too): ``o_proj`` and ``down_proj`` are
      ignored, which makes Torch-Pruning skip the hidden-size group only;
    - traced with eager attention: with SDPA's native grouped-query attention Torch-Pruning
      couples the 9-head q with the 3-head k and fails (``shape '[9, -1]' is invalid for
      input of size 192``); eager attention's explicit ``repeat_kv`` traces. Torch-Pruning
      then removes query heads, the same number from every key-value group, and keeps every
      k/v head (so ``num_key_value_groups`` drops, which the example's fix-up sets);
    - ``r`` (the FFN channel ratio) is set per layer so the layer loses ``share`` of its
      parameters given the heads Torch-Pruning removed (the example uses ``share`` for both).

    ``heads=False``: ``head_pruning_ratio=0``, FFN channels only (the same calls otherwise).
    Calibration data only provides the tracing example (magnitude needs no statistics).
    """
    import torch_pruning as tp

    units = Units.of(model)
    inputs = first_layer_inputs(model, calib[:1, :16])
    example = {**inputs.kwargs[0], "hidden_states": inputs.hidden[0]}
    head_ratio = share if heads else 0.0
    implementation = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    try:
        for layer in layers(model):
            target = share * _layer_total(layer)
            trial = _clone(layer)
            _tp_prune_layer(trial, example, share, head_ratio, tp)
            attn_removed = _layer_total(layer.self_attn) - _layer_total(trial.self_attn)
            ffn = layer.mlp.gate_proj.out_features * units.channel_params
            ratio = min(1.0, max(0.0, (target - attn_removed) / ffn))
            _tp_prune_layer(layer, example, ratio, head_ratio, tp)
    finally:
        model.config._attn_implementation = implementation
    return model


def torch_pruning_ffn(model: nn.Module, calib: torch.Tensor, share: float) -> nn.Module:
    """Torch-Pruning's LLM example with ``head_pruning_ratio=0``: FFN channels only."""
    return torch_pruning_llm(model, calib, share, heads=False)


def _clone(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def _tp_prune_layer(layer: nn.Module, example: dict, ratio: float, head_ratio: float,
                    tp: object) -> None:
    attn = layer.self_attn
    head_dim = attn.head_dim
    num_heads = {attn.q_proj: attn.q_proj.out_features // head_dim,
                 attn.k_proj: attn.k_proj.out_features // head_dim,
                 attn.v_proj: attn.v_proj.out_features // head_dim}
    pruner = tp.pruner.BasePruner(
        layer, example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        global_pruning=False, output_transform=lambda out: out[0] if isinstance(out, tuple)
        else out, pruning_ratio=ratio, ignored_layers=[attn.o_proj, layer.mlp.down_proj],
        num_heads=num_heads, prune_num_heads=True, prune_head_dims=False,
        head_pruning_ratio=head_ratio, round_to=4)
    for group in pruner.step(interactive=True):
        group.prune()
    heads = attn.q_proj.out_features // head_dim
    attn.num_key_value_groups = heads // max(1, attn.k_proj.out_features // head_dim)
    layer.mlp.intermediate_size = layer.mlp.gate_proj.out_features


# --- 5. unstructured magnitude -----------------------------------------------------------

def magnitude_unstructured(model: nn.Module, calib: torch.Tensor, share: float) -> nn.Module:
    """Zero the ``share`` smallest-magnitude weights of every linear layer of the decoder
    (per layer, no calibration): a mask, so the reference point for quality, not for speed."""
    with torch.no_grad():
        for module in layers(model).modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                k = int(share * w.numel())
                if k:
                    cut = w.abs().flatten().kthvalue(k).values
                    w[w.abs() <= cut] = 0
    return model


BASELINES: dict[str, Method] = {
    "flap": flap,
    "wanda_sp": wanda_sp,
    "slimgpt": slimgpt,
    "slimgpt_uniform": slimgpt_uniform,
    "torch_pruning": torch_pruning_llm,
    "torch_pruning_ffn": torch_pruning_ffn,
    "magnitude_unstructured": magnitude_unstructured,
}
"""The baselines by the name the harness and its report use."""
