"""The command line on a causal language model: a Hugging Face folder and a plain text file in,
perplexity out of prune and eval, prefill latency and generation tokens/s out of bench."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from surgery.cli import app
from surgery.cut.plan import PruningPlan

WORDS = "the a of to and in is was for on that with as by at it from this be are".split()


def invoke(*args: str):
    return CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer Llama (4 query heads sharing 2 key/value heads) with a word-level
    tokenizer, saved as a Hugging Face folder; random weights."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("llama")
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *WORDS])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (3000,), generator=g)]
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(" ".join(words))
    return path


def test_prune_eval_bench_a_causal_lm(llama_folder: Path, text_file: Path,
                                      tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    res = invoke("prune", str(llama_folder), "--data", str(text_file), "--seq-len", "16",
                 "--sparsity", "0.3", "--budget", "params", "--budget-scope", "model.layers",
                 "--calib-samples", "16", "--eval-samples", "8", "--latency-batch", "1",
                 "--sequential", "--depth-schedule", "log", "--out", str(out))
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "perplexity (" in flat and "prefill latency, batch 1" in flat
    assert "generation, 32 tokens (tokens/s" in flat
    assert "accuracy" not in flat
    report = (out / "report.md").read_text()
    assert "perplexity (" in report
    assert "bottom-up on the cut model's own activations" in " ".join(report.split())
    plan = PruningPlan.load(out / "plan.json")
    assert {g.kind for g in plan.groups} >= {"head", "neuron"}
    assert plan.budget["depth_schedule"] == "log"
    kept = {g.name: len(g.kept) for g in plan.groups if g.kind == "neuron"}
    assert [kept[n] for n in sorted(kept)] == [64, min(kept.values())] != [64, 64], kept

    res = invoke("eval", str(out), "--data", str(text_file), "--eval-samples", "4",
                 "--latency-batch", "0", "--json", str(tmp_path / "eval.json"))
    assert res.exit_code == 0, res.output
    measured = json.loads((tmp_path / "eval.json").read_text())
    dense, pruned = measured["dense"]["perplexity"], measured["pruned"]["perplexity"]
    assert dense["windows"] == pruned["windows"] == 4
    assert dense["tokens"] == 4 * 15 and pruned["value"] > 1

    res = invoke("bench", str(out), "--batch-sizes", "1", "--rounds", "3", "--new-tokens", "4")
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.split())
    assert "prefill of 16 tokens" in flat and "tokens/s" in flat


def test_causal_lm_input_errors(llama_folder: Path, tmp_path: Path) -> None:
    res = invoke("prune", str(tmp_path / "missing.gguf"), "--criterion", "magnitude",
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "does not exist" in res.output
    short = tmp_path / "short.txt"
    short.write_text("the a of")
    res = invoke("prune", str(llama_folder), "--data", str(short), "--seq-len", "16",
                 "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "shorter than one window" in " ".join(res.output.split())
    res = invoke("prune", str(llama_folder), "--out", str(tmp_path / "o"))
    assert res.exit_code == 1 and "criterion 'mi' needs calibration data" in res.output
