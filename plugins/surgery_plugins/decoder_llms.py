"""Hugging Face decoder LLMs (causal LMs of transformers 5.x): Llama and the families that
reuse its layout (SmolLM, Mistral, Qwen2), Qwen3, Gemma 2, Gemma 3 (text), Phi-3, GPT-2,
GPT-NeoX / Pythia, OPT.

Modules are recognised by structure (children and attributes), not by class name lists: a
causal self-attention module of ``transformers`` (``is_causal`` true) matching one of
:data:`DECODER_LAYOUTS`, a feed-forward block matching one of :data:`FFN_LAYOUTS`.

Capture. ``surgery.couple(model, {"input_ids": ..., "attention_mask": ...})`` works because:

* attention modules are fx leaves described by :func:`surgery.graph.rules.leaves.attention_rule`
  (their forwards unpack traced shapes, update caches and dispatch through
  ``ALL_ATTENTION_FUNCTIONS``: all inside the leaf);
* rotary embeddings (``*RotaryEmbedding``: cos/sin from position ids) are leaves through which
  no channel flows;
* transformers' ``Conv1D`` (GPT-2: a linear layer with its weight stored ``[in, out]``) is a
  leaf with a linear rule on the transposed weight;
* the mask builders of ``transformers.masking_utils`` are autowrapped (by
  :mod:`surgery_plugins.hf_encoders`, for every transformers model);
* the forward is traced with ``use_cache=False`` (``surgery_trace_kwargs``): a cache built
  while tracing would become graph state that every calibration pass grows. The graph only
  analyses the model at the example's shapes; the pruned model runs its own code, cache
  included.

RMSNorm layers, gated MLPs, GPT-NeoX's parallel residual, Gemma's sandwich norms, Phi-3's
fused ``gate_up_proj`` (a ``chunk(2)`` the engine couples position by position), the views of
GPT-2 and OPT to shapes read from other tensors all trace with the engine's generic rules.
Gemma's scaled embedding is a leaf (``nn.Embedding``'s rule) only so that it is one node that
can be frozen (see :func:`surgery_plugins.decoder_config.unscalable_embeddings`).

Refused: an attention module holding a tensor its layout does not name (OLMo 2's q/k norms
over all heads) is opaque, its reason naming the tensor; encoder-decoder models are left to
other plugins; mixture-of-experts layers do not trace.

Atoms and group kinds (``surgery_group_kind``): ``head``: by default a whole *KV group* (one
key/value head with the query heads that read it; for multi-head attention one head); with
``gqa_atoms("query")`` (or ``SURGERY_GQA_ATOMS=query``) the key/value heads stay and an atom is
query slot ``j`` of every KV group. ``head_dim`` is never cut (rotary embeddings rotate pairs
of it). ``neuron``: one FFN channel (gate, up and down rows/columns together, fused or not).
``hidden``: one residual-stream dimension (embeddings, every norm, every projection, the final
norm, a tied LM head). The LM head's outputs are the model's outputs and stay.

Fix-ups after slicing (from the weights alone, so they also run when :func:`surgery.io.load`
rebuilds a model): head counts of every attention, sizes of every MLP, Conv1D widths, and the
config (:mod:`surgery_plugins.decoder_config`).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator

import torch.fx as fx
import torch.nn as nn

from surgery.graph.propagate import Propagation
from surgery.graph.rules.layers import linear
from surgery.graph.rules.leaves import HeadLayout, attention_rule, fix_attention, matches
from surgery.hookspecs import hookimpl
from surgery_plugins import decoder_config
from surgery_plugins.transformers_common import KindMap, transformer_kind_weights

PHI3_LAYOUT = HeadLayout(qkv="qkv_proj", out="o_proj", heads=None, head_dim="head_dim",
                         kv_heads="num_key_value_heads", kv_groups="num_key_value_groups")
"""Phi-3: fused ``qkv_proj``, rows ``[q heads | k heads | v heads]``; its forward reads
``config.num_attention_heads`` to split them."""

DECODER_LAYOUTS: tuple[HeadLayout, ...] = (
    # Llama, SmolLM, Mistral, Qwen2, Qwen3 (q/k norms over head_dim), Gemma 2 and 3
    HeadLayout(q="q_proj", k="k_proj", v="v_proj", out="o_proj", heads=None, head_dim="head_dim",
               kv_heads="num_key_value_heads", kv_groups="num_key_value_groups"),
    PHI3_LAYOUT,
    # GPT-2: Conv1D c_attn, rows [q | k | v] of the transposed weight; split_size = heads * dim
    HeadLayout(qkv="c_attn", out="c_proj", heads="num_heads", head_dim="head_dim",
               products=("split_size",), hidden=("embed_dim",), transposed=True),
    # GPT-NeoX / Pythia: fused query_key_value interleaved per head, [heads, 3, head_size]
    HeadLayout(qkv="query_key_value", out="dense", heads=None, head_dim="head_size",
               qkv_order="head"),
    # OPT
    HeadLayout(q="q_proj", k="k_proj", v="v_proj", out="out_proj", heads="num_heads",
               head_dim="head_dim", hidden=("embed_dim",)),
)

FFN_LAYOUTS: tuple[tuple[tuple[str, ...], str], ...] = (
    (("gate_proj", "up_proj"), "down_proj"),  # Llama family, Gemma
    (("gate_up_proj",), "down_proj"),  # Phi-3: rows [gate | up]
    (("c_fc",), "c_proj"),  # GPT-2 (Conv1D)
    (("dense_h_to_4h",), "dense_4h_to_h"),  # GPT-NeoX
    (("fc1",), "fc2"),  # OPT (in the decoder layer itself)
)
"""The first projections (their rows are the FFN channels) and the down projection of each
feed-forward layout."""

GQA_ATOMS_ENV = "SURGERY_GQA_ATOMS"
_GQA_ATOMS: list[str] = []


@contextlib.contextmanager
def gqa_atoms(mode: str) -> Iterator[None]:
    """Choose the attention atoms of grouped-query attention while the block runs:
    ``"kv"`` (default: whole KV groups, both head counts drop together) or ``"query"`` (the
    key/value heads stay; atom ``j`` is the ``j``-th query head of every KV group). Read when
    the model is coupled (``surgery.couple`` / ``surgery.prune``); the environment variable
    ``SURGERY_GQA_ATOMS`` sets the default (for the command line)."""
    if mode not in ("kv", "query"):
        raise ValueError(f"gqa_atoms takes 'kv' or 'query', not {mode!r}")
    _GQA_ATOMS.append(mode)
    try:
        yield
    finally:
        _GQA_ATOMS.pop()


def gqa_atoms_mode() -> str:
    """The attention atoms in force: the innermost :func:`gqa_atoms`, else the environment,
    else ``"kv"``."""
    mode = _GQA_ATOMS[-1] if _GQA_ATOMS else os.environ.get(GQA_ATOMS_ENV, "kv") or "kv"
    if mode not in ("kv", "query"):
        raise ValueError(f"{GQA_ATOMS_ENV} must be 'kv' or 'query', not {mode!r}")
    return mode


# ---------------------------------------------------------------------------------------
# Recognising the modules
# ---------------------------------------------------------------------------------------

_LAYOUT_OF: dict[type, HeadLayout] = {}
"""Filled while tracing (for the rules); fix-ups never read these tables."""
_ROTARY: set[type] = set()
_CONV1D: set[type] = set()


def _from_transformers(module: nn.Module) -> bool:
    return type(module).__module__.startswith("transformers.")


def _causal_attention(module: nn.Module) -> bool:
    cls = type(module)
    return (_from_transformers(module) and "Cross" not in cls.__name__
            and getattr(module, "is_causal", False) is True
            and not getattr(module, "is_cross_attention", False))


def attention_modules(model: nn.Module, sliced: bool = False
                      ) -> Iterator[tuple[str, nn.Module, HeadLayout]]:
    """Every causal self-attention module of a transformers model with a known layout.
    ``sliced``: the weights were just sliced and the head attributes not fixed yet, so widths
    are not checked against them (the layouts differ by their children's names).
    Encoder-decoder models (BART, Whisper: their decoder self-attention looks like OPT's) are
    not decoder LLMs: their configs split the sizes by stack."""
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return
    for name, module in model.named_modules():
        if not _causal_attention(module):
            continue
        layout = next((lay for lay in DECODER_LAYOUTS if matches(module, lay, sizes=not sliced)),
                      None)
        if layout is not None:
            yield name, module, layout


def is_decoder_llm(model: nn.Module) -> bool:
    return any(True for _ in attention_modules(model))


def ffn_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module, tuple[str, ...], str]]:
    """(name, module, first projections, down projection) of every feed-forward block."""
    for name, module in model.named_modules():
        if not _from_transformers(module):
            continue
        for firsts, down in FFN_LAYOUTS:
            subs = [getattr(module, n, None) for n in (*firsts, down)]
            if all(_is_projection(s) for s in subs):
                yield name, module, firsts, down
                break


def _is_projection(module: Any) -> bool:
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def _is_conv1d(module: Any) -> bool:
    """transformers' ``Conv1D``: ``weight`` ``[nx, nf]``, ``y = x @ weight + bias``."""
    return (isinstance(module, nn.Module) and type(module).__name__ == "Conv1D"
            and _from_transformers(module) and isinstance(getattr(module, "nf", None), int))


def _is_rotary(module: nn.Module) -> bool:
    return _from_transformers(module) and type(module).__name__.endswith("RotaryEmbedding")


# ---------------------------------------------------------------------------------------
# Capture and channel rules
# ---------------------------------------------------------------------------------------


@hookimpl
def surgery_leaf_modules(model: nn.Module) -> list[type]:
    if not is_decoder_llm(model):
        return []
    leaves: list[type] = []
    for _, module, layout in attention_modules(model):
        _LAYOUT_OF.setdefault(type(module), layout)
        leaves.append(type(module))
    for module in model.modules():
        if _is_rotary(module):
            _ROTARY.add(type(module))
            leaves.append(type(module))
        elif _is_conv1d(module):
            _CONV1D.add(type(module))
            leaves.append(type(module))
        elif _is_scaled_embedding(module):  # nn.Embedding's rule; one node to freeze
            leaves.append(type(module))
    return list(dict.fromkeys(leaves))


def _is_scaled_embedding(module: nn.Module) -> bool:
    """Gemma's ``*ScaledWordEmbedding``: an ``nn.Embedding`` times a constant scale."""
    return (isinstance(module, nn.Embedding) and _from_transformers(module)
            and isinstance(getattr(module, "scalar_embed_scale", None), float))


@hookimpl
def surgery_trace_kwargs(model: nn.Module) -> dict[str, Any] | None:
    return {"use_cache": False} if is_decoder_llm(model) else None


def rotary_rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    """Rotary embeddings read the hidden states' dtype and device and the position ids only:
    no channel flows into their cos/sin (which live on ``head_dim``, never cut)."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, (tuple, list)):
        prop.set(node, tuple([] for _ in meta))
    else:
        prop.set(node, [])


def conv1d_rule(prop: Propagation, node: fx.Node, module: nn.Module) -> None:
    """transformers' ``Conv1D``: a linear layer whose weight is ``[in, out]``."""
    name = node.target
    linear(prop, node, node.args[0], prop.param(f"{name}.weight", 1),
           prop.param(f"{name}.weight", 0), [prop.param(f"{name}.bias", 0)])


@hookimpl
def surgery_module_rules() -> dict[type, Callable]:
    query = gqa_atoms_mode() == "query"
    rules: dict[type, Callable] = {cls: attention_rule(lay, query_atoms=query)
                                   for cls, lay in _LAYOUT_OF.items()}
    rules.update({cls: rotary_rule for cls in _ROTARY})
    rules.update({cls: conv1d_rule for cls in _CONV1D})
    return rules


@hookimpl
def surgery_frozen_modules(model: nn.Module) -> list[str]:
    """Scaled embeddings whose scale cannot be kept right after a cut (see
    :func:`surgery_plugins.decoder_config.unscalable_embeddings`)."""
    return decoder_config.unscalable_embeddings(model) if is_decoder_llm(model) else []


# ---------------------------------------------------------------------------------------
# Kinds
# ---------------------------------------------------------------------------------------


def _rows(module: nn.Module) -> int:
    return 1 if _is_conv1d(module) else 0


@hookimpl
def surgery_group_kind(group: Any, model: nn.Module) -> str | None:
    attentions = list(attention_modules(model))
    if not attentions:
        return None
    if group.reason == "model output":
        return "channel"  # the vocabulary
    kinds = KindMap()
    for name, module, layout in attentions:  # query rows, and key rows (query-slot atoms
        for proj in (layout.qkv, layout.q, layout.k):  # leave them in frozen groups)
            if proj:
                kinds.head.add((f"{name}.{proj}.weight", layout.rows))
    for name, module, firsts, _ in ffn_modules(model):
        prefix = f"{name}." if name else ""
        kinds.neuron |= {(f"{prefix}{f}.weight", _rows(getattr(module, f))) for f in firsts}
    return kinds.kind(group.slices, model) or _hidden_by_norm(group, model)


def _hidden_by_norm(group: Any, model: nn.Module) -> str | None:
    """RMSNorm layers are not ``nn.LayerNorm``: a group holding a norm's weight is hidden."""
    modules = dict(model.named_modules())
    for param, dim in group.slices:
        owner = modules.get(param.rpartition(".")[0])
        if dim == 0 and owner is not None and "Norm" in type(owner).__name__:
            return "hidden"
    return None


@hookimpl
def surgery_kind_weights(model: nn.Module, kinds: list[str]) -> dict[str, float] | None:
    return transformer_kind_weights(kinds) if "head" in kinds and is_decoder_llm(model) else None


# ---------------------------------------------------------------------------------------
# Fix-ups after slicing
# ---------------------------------------------------------------------------------------


@hookimpl
def surgery_fix_module(name: str, module: nn.Module, model: nn.Module) -> None:
    if _is_conv1d(module):
        module.nx, module.nf = (int(n) for n in module.weight.shape)


@hookimpl
def surgery_fix_model(model: nn.Module) -> None:
    attentions = list(attention_modules(model, sliced=True))
    if not attentions:
        return
    for _, module, layout in attentions:
        fix_attention(module, layout)
    ffns = list(ffn_modules(model))
    for _, module, firsts, down in ffns:
        decoder_config.fix_ffn(module, firsts, down)
    decoder_config.update(model, attentions, ffns, {PHI3_LAYOUT})
