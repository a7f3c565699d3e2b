"""Decoder LLMs after slicing: module sizes, Gemma's embedding scale, per-layer head counts
that a module reads from its config, and the config itself.

Everything here is computed from the sliced weights alone: :func:`surgery.io.load` rebuilds
the dense model from its base config in a fresh process, slices it by the plan and runs the
same fix-ups, with no table filled while tracing.

Config. ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, the FFN width
(``intermediate_size``; GPT-2's ``n_inner``, OPT's ``ffn_dim``) and ``head_dim`` (always set
explicitly, so that nothing derives it from ``hidden_size / num_attention_heads`` once either
is cut) take the pruned values when every layer agrees. When layers differ, or when the
architecture derives a size the config cannot express (GPT-2, GPT-NeoX and OPT compute
``head_dim`` as ``hidden_size // num_attention_heads``), ``config.surgery_layer_sizes`` records
the per-layer sizes, :func:`surgery.io.save` writes no ``config.json`` and ``from_pretrained``
on a ``save_pretrained`` folder fails on the shape mismatch instead of loading garbage. So
does a config that fails its own validation (Llama, Gemma and GPT-NeoX require
``hidden_size % num_attention_heads == 0``; ``save_pretrained`` then refuses it):
:func:`surgery.io.load` rebuilds such models from the dense config and the plan.

Gemma scales its token embeddings by ``sqrt(hidden_size)``, a constant the dense model computed
from its config. The pruned model keeps the dense constant (so it computes what it computed
before the cut), but a model rebuilt from the pruned config would use ``sqrt(new width)``. So
after a hidden cut the embedding table is multiplied by ``sqrt(old) / sqrt(new)`` and the
scale set to ``sqrt(new)``: the input embeddings are unchanged; a tied LM head would read the
table scaled too, so the final norm's output is divided by the same factor (its weight
refolded). A scaled embedding tied to a head whose final norm is not found cannot be handled:
its hidden dims are frozen (:func:`unscalable_embeddings`).

Phi-3's attention reads ``config.num_attention_heads`` at run time (to split its fused
projection). When a layer keeps another count than the config says, that module gets a
:class:`LayerConfig`: a view of the shared config with its own head counts.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn as nn

from surgery.graph.rules.leaves import HeadLayout, head_counts

_OFFSET_NORMS = ("GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm")
"""Norms computing ``x_hat * (1 + weight)``."""
_FFN_CONFIG = ("intermediate_size", "n_inner", "ffn_dim")
_HIDDEN_ATTRS = ("hidden_size", "embed_dim")


def _in_width(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[0] if type(module).__name__ == "Conv1D" else w.shape[1])


def _out_width(module: nn.Module) -> int:
    w = module.weight
    return int(w.shape[1] if type(module).__name__ == "Conv1D" else w.shape[0])


def fix_ffn(module: nn.Module, firsts: tuple[str, ...], down: str) -> None:
    """An FFN block's own size attributes (Llama's ``intermediate_size``/``hidden_size``)."""
    down_proj = getattr(module, down)
    if isinstance(getattr(module, "intermediate_size", None), int):
        module.intermediate_size = _in_width(down_proj)
    for attr in _HIDDEN_ATTRS:
        if isinstance(getattr(module, attr, None), int):
            setattr(module, attr, _out_width(down_proj))


def _first_projection(module: nn.Module, layout: HeadLayout) -> nn.Module:
    return getattr(module, layout.first_projection())


def layer_sizes(attentions: list[tuple[str, nn.Module, HeadLayout]],
                ffns: list[tuple[str, nn.Module, tuple[str, ...], str]]) -> dict[str, Any]:
    """Per-layer sizes of a (pruned) decoder, read from its weights."""
    counts = [head_counts(m, lay) for _, m, lay in attentions]
    return {
        "hidden_size": _in_width(_first_projection(attentions[0][1], attentions[0][2])),
        "num_attention_heads": [q for q, _ in counts],
        "num_key_value_heads": [kv for _, kv in counts],
        "head_dim": [int(getattr(m, lay.head_dim)) for _, m, lay in attentions],
        "intermediate_size": [_in_width(getattr(m, down)) for _, m, _, down in ffns],
    }


def _uniform(values: list[int]) -> int | None:
    return values[0] if values and len(set(values)) == 1 else None


def update(model: nn.Module, attentions: list[tuple[str, nn.Module, HeadLayout]],
           ffns: list[tuple[str, nn.Module, tuple[str, ...], str]],
           reads_config_heads: set[HeadLayout]) -> None:
    """Every size attribute and the config after slicing; see the module docstring."""
    sizes = layer_sizes(attentions, ffns)
    _fix_hidden_attributes(model, attentions, ffns, sizes["hidden_size"])
    rescale_embeddings(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return
    if hasattr(config, "hidden_size"):
        config.hidden_size = sizes["hidden_size"]
    if getattr(config, "word_embed_proj_dim", None) is not None:  # OPT without project_in
        emb = model.get_input_embeddings()
        config.word_embed_proj_dim = int(emb.weight.shape[1])
    for key in ("num_attention_heads", "num_key_value_heads", "head_dim"):
        value = _uniform(sizes[key])
        if value is not None and (hasattr(config, key) or key == "head_dim"):
            setattr(config, key, value)
    ffn = _uniform(sizes["intermediate_size"])
    if ffn is not None:
        key = next((k for k in _FFN_CONFIG if hasattr(config, k)
                    and k not in getattr(config, "attribute_map", {})), None)
        if key is not None:
            setattr(config, key, ffn)
    for (_, module, layout), (n_q, n_kv) in zip(attentions, zip(sizes["num_attention_heads"],
                                                                sizes["num_key_value_heads"])):
        if layout in reads_config_heads:
            _own_head_counts(module, config, n_q, n_kv)
    if hasattr(config, "surgery_layer_sizes"):
        del config.surgery_layer_sizes
    if not describes(model):
        config.surgery_layer_sizes = sizes


def describes(model: nn.Module) -> bool:
    """Whether ``model.config`` describes the model: it passes the config's own validation
    (Llama's requires ``hidden_size % num_attention_heads == 0`` even with an explicit
    ``head_dim``; ``save_pretrained`` runs it) and ``type(model)(config)`` has the model's
    parameter shapes (built on the meta device)."""
    config = copy.deepcopy(model.config)
    try:
        validate = getattr(config, "validate", None)
        if callable(validate):
            validate()
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def _fix_hidden_attributes(model: nn.Module, attentions: list, ffns: list, width: int) -> None:
    """``hidden_size``/``embed_dim`` of every decoder layer, FFN, attention and of the base
    model that holds them (GPT-2's ``embed_dim``)."""
    holders = {id(m): m for _, m, *_ in attentions + ffns}
    names = [n for n, *_ in attentions + ffns]
    for name, module in model.named_modules():
        if name and any(n.startswith(f"{name}.") for n in names):
            holders[id(module)] = module  # a decoder layer, the base model
    for module in holders.values():
        if type(module).__module__.startswith("transformers."):
            for attr in _HIDDEN_ATTRS:
                if isinstance(getattr(module, attr, None), int):
                    setattr(module, attr, width)


# ---------------------------------------------------------------------------------------
# Gemma's scaled embeddings
# ---------------------------------------------------------------------------------------


def _scaled_embedding(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_input_embeddings", None)
    emb = get() if callable(get) else None
    if isinstance(getattr(emb, "scalar_embed_scale", None), float) and isinstance(
            getattr(emb, "embed_scale", None), torch.Tensor):
        return emb
    return None


def _final_norm(model: nn.Module) -> nn.Module | None:
    """The norm the LM head reads: the base model's ``norm``."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None) or model
    norm = getattr(base, "norm", None)
    return norm if isinstance(getattr(norm, "weight", None), torch.Tensor) else None


def _tied_head(model: nn.Module, emb: nn.Module) -> bool:
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    return head is not None and head.weight is emb.weight


def unscalable_embeddings(model: nn.Module) -> list[str]:
    """Qualified names of scaled embeddings whose hidden dims cannot be cut: tied to the LM
    head with no final norm to fold the compensating factor into."""
    emb = _scaled_embedding(model)
    if emb is None or not _tied_head(model, emb) or _final_norm(model) is not None:
        return []
    return [n for n, m in model.named_modules() if m is emb]


def rescale_embeddings(model: nn.Module) -> None:
    """Make a scaled embedding's scale ``sqrt(width)`` again without changing the function."""
    emb = _scaled_embedding(model)
    if emb is None:
        return
    wanted = float(emb.weight.shape[1]) ** 0.5
    if math.isclose(emb.scalar_embed_scale, wanted, rel_tol=1e-9):
        return
    factor = emb.scalar_embed_scale / wanted
    with torch.no_grad():
        emb.weight.mul_(factor)
        emb.embed_scale.fill_(wanted)
        emb.scalar_embed_scale = wanted
        norm = _final_norm(model)
        if _tied_head(model, emb) and norm is not None:
            if type(norm).__name__ in _OFFSET_NORMS:
                norm.weight.copy_((1 + norm.weight) / factor - 1)
            else:
                norm.weight.div_(factor)
                bias = getattr(norm, "bias", None)
                if bias is not None:
                    bias.div_(factor)


# ---------------------------------------------------------------------------------------
# Per-layer head counts read from a config
# ---------------------------------------------------------------------------------------


class LayerConfig:
    """A view of a shared config with a few values of its own (one attention's head counts):
    everything else, ``_attn_implementation`` included, is read from and written to the
    shared config, so switching the model's attention implementation still reaches it."""

    def __init__(self, base: Any, **own: Any) -> None:
        object.__setattr__(self, "_base", base)
        object.__setattr__(self, "_own", dict(own))

    def __getattr__(self, name: str) -> Any:
        own = self.__dict__.get("_own")
        if own is None:  # while being copied
            raise AttributeError(name)
        if name in own:
            return own[name]
        return getattr(self.__dict__["_base"], name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            self._own[name] = value
        else:
            setattr(self._base, name, value)


def _own_head_counts(module: nn.Module, config: Any, n_q: int, n_kv: int) -> None:
    if n_q == config.num_attention_heads and n_kv == getattr(config, "num_key_value_heads", n_kv):
        module.config = config
    else:
        module.config = LayerConfig(config, num_attention_heads=n_q, num_key_value_heads=n_kv)
