"""Physical surgery on a transformers 5 Llama decoder, shared by the LLM baselines.

Every baseline in ``llm_baselines.py`` decides *which* attention units and FFN channels go;
this module does the cutting the same way for all of them, so that differences in the
benchmark come from the choice and compensation and never from how the slicing is done:

- an attention unit is one key-value group (one k/v head with the query heads that read it).
  Removing whole groups leaves ``num_key_value_groups`` (query heads per k/v head) as it
  was, and transformers 5's ``LlamaAttention`` infers the head count from the tensor shape,
  so no attribute has to change;
- a layer that keeps no group gets :class:`EmptyAttention` (``LlamaAttention`` cannot view a
  zero-width projection as heads): it outputs the ``o_proj`` bias (a compensation bias, or
  zero) and writes a one-number-wide placeholder into the KV cache so the cache still counts
  positions (``DynamicLayer.get_seq_length`` reads 0 from an empty tensor, which would restart
  the rotary positions of every generated token if layer 0 lost all its heads);
- an FFN channel is one row of ``gate_proj`` and ``up_proj`` and the matching column of
  ``down_proj``; a zero-channel FFN is fine as it is (``nn.Linear`` with zero features
  computes zeros, plus the bias).

Counting follows the brief: the decoder layers' parameters, ``model.layers.*`` (norms and any
added compensation bias included; embeddings and the tied LM head not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn as nn


@dataclass(frozen=True)
class Units:
    """Sizes of the pruning units of one (dense) Llama decoder layer."""

    head_dim: int
    groups: int  # key-value heads
    q_per_group: int  # query heads per key-value head
    hidden: int
    ffn: int

    @classmethod
    def of(cls, model: nn.Module) -> "Units":
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        return cls(head_dim, c.num_key_value_heads,
                   c.num_attention_heads // c.num_key_value_heads, c.hidden_size,
                   c.intermediate_size)

    @property
    def group_width(self) -> int:
        """``o_proj`` input channels of one key-value group (its query heads' outputs)."""
        return self.q_per_group * self.head_dim

    @property
    def group_params(self) -> int:
        """Weights one key-value group owns: its q, o rows/columns and its k, v rows."""
        return (2 * self.q_per_group + 2) * self.head_dim * self.hidden

    @property
    def channel_params(self) -> int:
        """Weights one FFN channel owns: a row of gate and up, a column of down."""
        return 3 * self.hidden


def layers(model: nn.Module) -> nn.ModuleList:
    return model.model.layers


def decoder_params(model: nn.Module, nonzero: bool = False) -> int:
    """Parameters of ``model.layers.*``; with ``nonzero``, only the ones not masked to 0."""
    params = layers(model).parameters()
    if nonzero:
        return sum(int(torch.count_nonzero(p)) for p in params)
    return sum(p.numel() for p in params)


def layer_fixed_params(layer: nn.Module) -> int:
    """Parameters of a decoder layer no unit owns (the two RMSNorm weights)."""
    return sum(p.numel() for n, p in layer.named_parameters() if "norm" in n)


class EmptyAttention(nn.Module):
    """Attention of a layer whose every key-value group was removed.

    Its output is a constant: the bias of the ``o_proj`` it replaces (FLAP's mean
    compensation) or zero. Only the cache needs care: see the module docstring.
    """

    def __init__(self, layer_idx: int, bias: torch.Tensor | None, hidden: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden = hidden
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())

    def forward(self, hidden_states: torch.Tensor, *args: Any, cache: Any = None,
                past_key_values: Any = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = cache if cache is not None else past_key_values
        b, t = hidden_states.shape[:2]
        if cache is not None:
            placeholder = hidden_states.new_zeros(b, 1, t, 1)
            cache.update(placeholder, placeholder, self.layer_idx)
        out = hidden_states.new_zeros(b, t, self.hidden)
        return (out if self.bias is None else out + self.bias), None


def sliced_linear(linear: nn.Linear, rows: torch.Tensor | None = None,
                  cols: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                  bias: torch.Tensor | None = None) -> nn.Linear:
    """A new ``nn.Linear`` holding ``weight`` (default: ``linear.weight[rows][:, cols]``) and
    ``bias`` (default: the old bias, sliced by ``rows``): physically smaller, so faster."""
    w = linear.weight.data if weight is None else weight
    if weight is None:
        if rows is not None:
            w = w[rows]
        if cols is not None:
            w = w[:, cols]
    if bias is None and linear.bias is not None:
        bias = linear.bias.data if rows is None else linear.bias.data[rows]
    new = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device,
                    dtype=linear.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def group_channels(units: Units, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(query/o_proj channels, key/value channels) of key-value groups ``groups``."""
    q = (groups[:, None] * units.group_width
         + torch.arange(units.group_width)[None]).reshape(-1)
    kv = (groups[:, None] * units.head_dim + torch.arange(units.head_dim)[None]).reshape(-1)
    return q, kv


def keep_groups(layer: nn.Module, units: Units, keep: torch.Tensor,
                o_weight: torch.Tensor | None = None, o_bias: torch.Tensor | None = None
                ) -> None:
    """Keep only the key-value groups ``keep`` (indices into the layer's current groups) of
    ``layer.self_attn``. ``o_weight``: the kept ``o_proj`` columns when a method updated them
    (OBS); ``o_bias``: a compensation bias for ``o_proj``."""
    attn = layer.self_attn
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if len(keep) == 0:
        layer.self_attn = EmptyAttention(attn.layer_idx, o_bias, units.hidden).to(
            attn.o_proj.weight.device)
        return
    q, kv = group_channels(units, keep)
    attn.q_proj = sliced_linear(attn.q_proj, rows=q)
    attn.k_proj = sliced_linear(attn.k_proj, rows=kv)
    attn.v_proj = sliced_linear(attn.v_proj, rows=kv)
    attn.o_proj = sliced_linear(attn.o_proj, cols=q, weight=o_weight, bias=o_bias)


def keep_channels(layer: nn.Module, keep: torch.Tensor, down_weight: torch.Tensor | None = None,
                  down_bias: torch.Tensor | None = None) -> None:
    """Keep only FFN channels ``keep`` of ``layer.mlp`` (``down_weight``: updated kept
    columns of ``down_proj``; ``down_bias``: a compensation bias)."""
    mlp = layer.mlp
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=keep, weight=down_weight, bias=down_bias)
    mlp.intermediate_size = len(keep)


def attention_groups(layer: nn.Module, units: Units) -> int:
    """Key-value groups ``layer`` still has."""
    attn = layer.self_attn
    return 0 if isinstance(attn, EmptyAttention) else attn.k_proj.out_features // units.head_dim


def structure(model: nn.Module) -> list[tuple[int, int, int]]:
    """(query heads, key-value heads, FFN channels) left in each layer: what a report
    prints."""
    units = Units.of(model)
    out = []
    for layer in layers(model):
        attn = layer.self_attn
        q = 0 if isinstance(attn, EmptyAttention) else attn.q_proj.out_features // units.head_dim
        out.append((q, attention_groups(layer, units), layer.mlp.gate_proj.out_features))
    return out


def split_layer_budget(remove: float, units: Units, groups: int, channels: int
                       ) -> tuple[int, int]:
    """(groups, channels) to remove from one layer so it loses about ``remove`` parameters.

    The uniform methods prune "the same ratio of heads and of channels" in every layer; with
    3 key-value groups a ratio of 0.2 is 0.6 of a group. The group count is rounded down, as
    FLAP's ``prune_wanda_sp`` does (``sorted(scores)[int(ratio * num_heads)]`` is the
    threshold), and the FFN channels make up the rest of the layer's target, which keeps each
    layer (and the model) within one FFN channel of it."""
    total = groups * units.group_params + channels * units.channel_params
    share = min(max(remove / total, 0.0), 1.0)
    g = min(groups, int(share * groups + 1e-9))
    rest = remove - g * units.group_params
    c = min(channels, max(0, int(round(rest / units.channel_params))))
    if c == channels and rest > c * units.channel_params + units.group_params / 2 and g < groups:
        g += 1  # the FFN alone cannot absorb the rest: take one more group
    return g, c


# --- calibration: the inputs of every decoder layer, run layer by layer ----------------------

@dataclass
class LayerInputs:
    """The hidden states entering one decoder layer for every calibration batch, with the
    keyword arguments the model passed (rotary embeddings, mask, positions)."""

    hidden: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def run(self, layer: nn.Module) -> "LayerInputs":
        """The next layer's inputs: ``layer`` applied to every batch."""
        with torch.no_grad():
            out = [_first(layer(h, **kw)) for h, kw in zip(self.hidden, self.kwargs)]
        return LayerInputs(out, self.kwargs)


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


class _Stop(Exception):
    pass


def first_layer_inputs(model: nn.Module, calib: torch.Tensor, batch: int = 8) -> LayerInputs:
    """Run the embeddings only and catch what enters layer 0, batch by batch (the way
    SparseGPT/Wanda/FLAP's ``prepare_calibration_input`` does, with a pre-hook)."""
    caught: LayerInputs = LayerInputs([], [])

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.hidden.append(hidden.detach())
        kw = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        kw["cache"], kw["use_cache"] = None, False
        caught.kwargs.append(kw)
        raise _Stop

    handle = layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in calib.split(batch):
                try:
                    model.model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return caught


def batches_through(model: nn.Module, calib: torch.Tensor,
                    batch: int = 8) -> Iterator[torch.Tensor]:
    """Calibration batches for a full forward of the decoder stack (no LM head)."""
    with torch.no_grad():
        for ids in calib.split(batch):
            model.model(input_ids=ids, use_cache=False)
            yield ids


def linear_inputs(layer: nn.Module, inputs: LayerInputs, names: tuple[str, ...],
                  collect: dict[str, Any]) -> LayerInputs:
    """Run ``layer`` over the calibration inputs with ``collect[name].add(x)`` fed every
    input of the submodule ``name`` (flattened to (tokens, features)); returns the outputs."""
    handles = []
    for name in names:
        module = layer.get_submodule(name)
        stats = collect[name]

        def hook(_m: nn.Module, args: tuple, _out: Any, stats: Any = stats) -> None:
            x = args[0]
            stats.add(x.reshape(-1, x.shape[-1]).detach())

        handles.append(module.register_forward_hook(hook))
    try:
        return inputs.run(layer)
    finally:
        for h in handles:
            h.remove()
