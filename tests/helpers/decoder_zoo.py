"""Small, randomly initialised decoder LLMs (real ``transformers`` causal-LM classes, tiny
configs, no hub access): two layers, hidden size 64, FFN 128, vocabulary 200; four query
heads of 16 and two key/value heads where the family has grouped-query attention, four heads
of 16 otherwise. Each builder seeds torch, so two calls give the same weights.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

VOCAB = 200
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
           head_dim=16, intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
           **TOKENS)


def _hf(model_cls: str, config_cls: str, **config: Any) -> Callable[[], torch.nn.Module]:
    def make() -> torch.nn.Module:
        import transformers

        cfg = getattr(transformers, config_cls)(**config)
        return getattr(transformers, model_cls)(cfg)

    return make


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "llama": _hf("LlamaForCausalLM", "LlamaConfig", **GQA),
    # SmolLM / SmolLM2 are Llamas with a tied LM head
    "smollm": _hf("LlamaForCausalLM", "LlamaConfig", tie_word_embeddings=True, **GQA),
    "mistral": _hf("MistralForCausalLM", "MistralConfig", **GQA),
    "qwen2": _hf("Qwen2ForCausalLM", "Qwen2Config", **GQA),
    "qwen3": _hf("Qwen3ForCausalLM", "Qwen3Config", **GQA),
    "gemma2": _hf("Gemma2ForCausalLM", "Gemma2Config", **GQA),
    "gemma3": _hf("Gemma3ForCausalLM", "Gemma3TextConfig", **GQA),
    "phi3": _hf("Phi3ForCausalLM", "Phi3Config", **GQA),
    "gpt2": _hf("GPT2LMHeadModel", "GPT2Config", n_embd=64, n_layer=2, n_head=4, n_inner=128,
                vocab_size=VOCAB, n_positions=64, bos_token_id=1, eos_token_id=2),
    "gpt_neox": _hf("GPTNeoXForCausalLM", "GPTNeoXConfig", hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=128, vocab_size=VOCAB,
                    max_position_embeddings=64, **TOKENS),
    "opt": _hf("OPTForCausalLM", "OPTConfig", hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, ffn_dim=128, vocab_size=VOCAB, max_position_embeddings=64,
               word_embed_proj_dim=64, **TOKENS),
}
FAMILIES = list(BUILDERS)
GQA_FAMILIES = ["llama", "smollm", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"]
LENGTHS = (10, 6, 3)  # one full row and two left-padded rows


def make(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return BUILDERS[name]().eval()


def tokens(batch: int, length: int, seed: int = 1, lengths: tuple[int, ...] | None = None
           ) -> dict[str, torch.Tensor]:
    """Token ids with an attention mask; with ``lengths``, rows are left-padded to them (pad
    id 0), as a causal LM is fed for generation."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(lengths or ()):
        ids[row, :length - n] = 0
        mask[row, :length - n] = 0
    return {"input_ids": ids, "attention_mask": mask}


def inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """The example batch: three rows, two of them left-padded."""
    return tokens(len(LENGTHS), max(LENGTHS), seed, LENGTHS)


def calibration(batches: int = 4, seed: int = 10) -> list[dict[str, torch.Tensor]]:
    return [tokens(4, 12, seed + i) for i in range(batches)]


_COUPLED: dict[str, tuple] = {}


def coupled(name: str) -> tuple:
    """(model, example inputs, coupling) of ``make(name)``, built once per session and shared
    by every test module; tests must not change them."""
    if name not in _COUPLED:
        import surgery

        model = make(name)
        x = inputs()
        _COUPLED[name] = (model, x, surgery.couple(model, x))
    return _COUPLED[name]


def logits(model: torch.nn.Module, x: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model(**x, **kwargs).logits


def positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids ``generate`` gives a left-padded batch."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


def greedy_loop(model: torch.nn.Module, x: dict, steps: int) -> torch.Tensor:
    """Greedy decoding by plain forwards over the whole sequence (no cache), with the
    position ids ``generate`` gives left-padded rows; a row that emitted the end-of-sequence
    token continues with padding, as in ``generate``."""
    ids, mask = x["input_ids"], x["attention_mask"]
    eos = model.generation_config.eos_token_id
    done = torch.zeros(len(ids), dtype=torch.bool)
    for _ in range(steps):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                        use_cache=False).logits
        nxt = out[:, -1].argmax(-1).masked_fill(done, 0)
        done |= nxt == eos
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


# ---------------------------------------------------------------------------------------
# Every width attribute and config field against the weights
# ---------------------------------------------------------------------------------------


def _rows(m: torch.nn.Module) -> int:
    return int(m.weight.shape[1] if type(m).__name__ == "Conv1D" else m.weight.shape[0])


def _cols(m: torch.nn.Module) -> int:
    return int(m.weight.shape[0] if type(m).__name__ == "Conv1D" else m.weight.shape[1])


def _attention_sizes(m: torch.nn.Module) -> tuple[int, int, int, int] | None:
    """(hidden, query heads, key/value heads, head size) of an attention module, from its
    weights, checking its own attributes on the way (AssertionError names the mismatch)."""
    if hasattr(m, "q_proj") and hasattr(m, "o_proj"):  # Llama family, Gemma, Qwen
        dim = m.head_dim
        n_q, n_kv = _cols(m.o_proj) // dim, _rows(m.k_proj) // dim
        assert _rows(m.q_proj) == n_q * dim and _rows(m.v_proj) == n_kv * dim
        assert m.num_key_value_groups == n_q // n_kv, "num_key_value_groups"
        return _cols(m.q_proj), n_q, n_kv, dim
    if hasattr(m, "qkv_proj"):  # Phi-3: also reads its config's head count
        dim = m.head_dim
        n_q = _cols(m.o_proj) // dim
        n_kv = (_rows(m.qkv_proj) // dim - n_q) // 2
        assert m.num_key_value_heads == n_kv and m.num_key_value_groups == n_q // n_kv
        assert m.config.num_attention_heads == n_q, "Phi-3 reads config.num_attention_heads"
        return _cols(m.qkv_proj), n_q, n_kv, dim
    if hasattr(m, "c_attn"):  # GPT-2
        dim, n = m.head_dim, m.num_heads
        assert _rows(m.c_attn) == 3 * n * dim and m.split_size == n * dim, "GPT-2 heads"
        assert _cols(m.c_proj) == n * dim and m.embed_dim == _cols(m.c_attn)
        return _cols(m.c_attn), n, n, dim
    if hasattr(m, "query_key_value"):  # GPT-NeoX
        dim = m.head_size
        n = _cols(m.dense) // dim
        assert _rows(m.query_key_value) == 3 * n * dim
        return _cols(m.query_key_value), n, n, dim
    if hasattr(m, "out_proj"):  # OPT
        dim, n = m.head_dim, m.num_heads
        assert _rows(m.q_proj) == n * dim == _cols(m.out_proj) and m.embed_dim == _cols(m.q_proj)
        return _cols(m.q_proj), n, n, dim
    return None


_FFN = (("gate_proj", "down_proj"), ("gate_up_proj", "down_proj"), ("c_fc", "c_proj"),
        ("dense_h_to_4h", "dense_4h_to_h"), ("fc1", "fc2"))


def check_widths(model: torch.nn.Module) -> dict[str, Any]:
    """Assert that every width attribute and config field describes the weights; return the
    per-layer sizes read from the weights."""
    layers: dict[str, list[int]] = {"q": [], "kv": [], "dim": [], "ffn": []}
    hidden = None
    for name, m in model.named_modules():
        cls = type(m).__name__
        if isinstance(m, torch.nn.Linear):
            assert (m.out_features, m.in_features) == tuple(m.weight.shape), name
        elif cls == "Conv1D":
            assert (m.nx, m.nf) == tuple(m.weight.shape), name
        elif isinstance(m, torch.nn.Embedding):
            assert m.embedding_dim == m.weight.shape[1], name
        elif isinstance(m, torch.nn.LayerNorm):
            assert tuple(m.normalized_shape) == tuple(m.weight.shape), name
        if cls.endswith("Attention"):
            sizes = _attention_sizes(m)
            assert sizes is not None, name
            hidden = sizes[0]
            for key, value in zip(("q", "kv", "dim"), sizes[1:]):
                layers[key].append(value)
        for first, down in _FFN:
            if hasattr(m, first) and hasattr(m, down) and not cls.endswith("Attention"):
                ffn = _cols(getattr(m, down))
                layers["ffn"].append(ffn)
                if isinstance(getattr(m, "intermediate_size", None), int):
                    assert m.intermediate_size == ffn, name
                break
    for name, m in model.named_modules():
        for attr in ("hidden_size", "embed_dim"):
            value = getattr(m, attr, None)
            if isinstance(value, int) and type(m).__module__.startswith("transformers."):
                assert value == hidden, f"{name}.{attr} = {value}, hidden size {hidden}"
    _check_config(model, hidden, layers)
    return {"hidden": hidden, **layers}


def _check_config(model: torch.nn.Module, hidden: int | None, layers: dict[str, list[int]]
                  ) -> None:
    config = model.config
    recorded = getattr(config, "surgery_layer_sizes", None)
    if recorded is not None:  # the config cannot describe the model: every size is recorded
        assert recorded["hidden_size"] == hidden
        assert recorded["num_attention_heads"] == layers["q"]
        assert recorded["num_key_value_heads"] == layers["kv"]
        assert recorded["head_dim"] == layers["dim"]
        assert recorded["intermediate_size"] == layers["ffn"]
        return
    assert config.hidden_size == hidden
    assert {config.num_attention_heads} == set(layers["q"])
    if getattr(config, "num_key_value_heads", None) is not None:
        assert {config.num_key_value_heads} == set(layers["kv"])
    if getattr(config, "head_dim", None) is not None:  # set by every cut; GPT-2 has none
        assert {config.head_dim} == set(layers["dim"])
    ffn = next(getattr(config, k) for k in ("intermediate_size", "n_inner", "ffn_dim")
               if getattr(config, k, None) is not None)
    assert {ffn} == set(layers["ffn"])
    with torch.device("meta"):  # and the config rebuilds these very shapes
        fresh = type(model)(copy.deepcopy(config))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()}
