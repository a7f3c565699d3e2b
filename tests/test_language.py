"""Measuring causal language models: perplexity agrees with transformers' own loss and skips
padding; plain text files become token windows split 80/20; generation is timed per model."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from surgery.cli.data import load_data
from surgery.errors import LoadError, SurgeryError
from surgery.language import (
    generation_speed,
    is_causal_lm,
    perplexity,
    text_split,
    token_windows,
)


def _llama() -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


class _Chars:
    """A tokenizer of one id per character (what load_data needs of a tokenizer)."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) % 300 for c in text]}


def test_perplexity_is_exp_of_transformers_loss() -> None:
    model = _llama()
    ids = torch.randint(0, 300, (3, 20))
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    measured = perplexity(model, [ids[:2], {"input_ids": ids[2:]}])
    assert measured.tokens == 3 * 19 and measured.windows == 3
    assert measured.value == pytest.approx(math.exp(loss.item()), rel=1e-4)
    assert measured.standard_error > 0


def test_padded_positions_are_not_scored() -> None:
    model = _llama()
    ids = torch.randint(0, 300, (1, 20))
    mask = torch.ones_like(ids)
    mask[:, 15:] = 0
    padded = perplexity(model, [{"input_ids": ids, "attention_mask": mask}])
    cut = perplexity(model, [ids[:, :15]])
    assert padded.tokens == cut.tokens == 14
    assert padded.value == pytest.approx(cut.value, rel=1e-4)


def test_perplexity_refuses_a_classifier() -> None:
    model = torch.nn.Sequential(torch.nn.Embedding(300, 8), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 20, 3))
    with pytest.raises(SurgeryError, match="causal language model"):
        perplexity(model, [torch.randint(0, 300, (2, 20))])


def test_text_files_are_token_windows_split_80_20(tmp_path) -> None:
    text = "".join(chr(97 + i % 26) for i in range(1000))
    path = tmp_path / "corpus.txt"
    path.write_text(text)
    inputs = {"kind": "causal", "seq_len": 50}
    tok = _Chars()
    train = load_data(str(path), inputs, split="train", batch_size=4, limit=None, tokenizer=tok)
    test = load_data(str(path), inputs, split="test", batch_size=4, limit=None, tokenizer=tok)
    whole = load_data(f"{path}:all", inputs, split="test", batch_size=4, limit=None,
                      tokenizer=tok)
    count = [sum(len(b["input_ids"]) for b in d) for d in (train, test, whole)]
    assert count == [16, 4, 20]
    first = next(iter(test))["input_ids"][0]
    assert torch.equal(first, token_windows(tok, text[800:], 50)[0])
    assert text_split(text, "train") + text_split(text, "test") == text
    with pytest.raises(SurgeryError, match="train, test or all"):
        list(load_data(f"{path}:dev", inputs, batch_size=4, limit=None, tokenizer=tok))
    with pytest.raises(LoadError, match="causal language model"):
        load_data(str(path), {"kind": "text", "seq_len": 50}, batch_size=4, limit=None,
                  tokenizer=tok)
    with pytest.raises(LoadError, match="shorter than one window"):
        load_data(str(path), {"kind": "causal", "seq_len": 400}, split="test", batch_size=4,
                  limit=None, tokenizer=tok)


def test_generation_speed_times_each_model() -> None:
    model = _llama()
    assert is_causal_lm(model) and not is_causal_lm(torch.nn.Linear(2, 2))
    speed = generation_speed({"dense": model, "pruned": model},
                             torch.randint(0, 300, (2, 8)), new_tokens=4, rounds=3)
    assert set(speed.tokens_per_s) == {"dense", "pruned"}
    assert all(rate > 0 for rate in speed.tokens_per_s.values())
    assert speed.speedup is not None and speed.speedup.rounds == 3
    assert speed.batch == 2 and speed.new_tokens == 4
