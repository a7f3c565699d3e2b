"""What a causal language model is measured by: perplexity over token windows, and how fast
it generates.

Perplexity is ``exp`` of the mean next-token negative log-likelihood over every predicted
token of every window (the first token of a window has no context and is not scored). Its
standard error comes from the spread of the per-window means (windows are the independent
draws; tokens within one are not), carried through ``exp`` (delta method): what a comparison
of two perplexities needs beside it. Generation speed is timed with the KV cache, greedy,
a fixed number of new tokens, the models interleaved (:mod:`surgery.timing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F

from surgery._core.batches import call, first_tensor, split_batch, to_device
from surgery._core.modes import evaluating
from surgery.errors import SurgeryError
from surgery.timing import Speedup, Timing, time_interleaved

CALIBRATION_SHARE = 0.8
"""A plain text file calibrates on its first 80% of characters and evaluates on the rest."""


def text_split(text: str, split: str) -> str:
    """The ``train`` (calibration) or ``test`` (evaluation) part of ``text``, or ``all``."""
    cut = int(len(text) * CALIBRATION_SHARE)
    parts = {"train": text[:cut], "test": text[cut:], "all": text}
    if split not in parts:
        raise SurgeryError(f"a text split is train, test or all, not {split!r}.")
    return parts[split]


def token_windows(tokenizer: Any, text: str, length: int = 256,
                  limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, ``(windows, length)``: what perplexity is
    measured over and calibration reads (a final partial window is dropped)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    n = len(ids) // length
    if limit is not None:
        n = min(n, limit)
    return ids[: n * length].view(n, length)


def is_causal_lm(model: torch.nn.Module) -> bool:
    """A Hugging Face causal language model (``...ForCausalLM``, ``GPT2LMHeadModel`` ...)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    except ImportError:
        return False
    return type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@dataclass(frozen=True)
class Perplexity:
    value: float
    standard_error: float
    tokens: int
    windows: int

    def text(self) -> str:
        return f"{self.value:.2f} ± {self.standard_error:.2f}"


def perplexity(model: torch.nn.Module, batches: Iterable[Any],
               progress: Callable[[int], None] | None = None) -> Perplexity:
    """Perplexity of ``model`` on batches of token windows (``input_ids`` tensors, or dicts
    with ``input_ids`` and optionally ``attention_mask``; padded positions are not scored)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    window_means: list[float] = []
    total_nll, total_tokens = 0.0, 0
    with evaluating(model), torch.inference_mode():
        for i, batch in enumerate(batches):
            inputs, _ = split_batch(batch)
            inputs = to_device(inputs, device)
            ids = inputs["input_ids"] if isinstance(inputs, dict) else inputs
            if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
                raise SurgeryError(f"perplexity needs (windows, tokens) token ids; batch {i} "
                                   f"has {type(ids).__name__} "
                                   f"{tuple(getattr(ids, 'shape', ()))}.")
            logits = first_tensor(call(model, inputs))
            if logits is None or logits.ndim != 3:
                raise SurgeryError("perplexity needs a causal language model's next-token "
                                   "scores (batch, tokens, vocabulary).")
            nll = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:],
                                  reduction="none")
            mask = (inputs.get("attention_mask") if isinstance(inputs, dict) else None)
            scored = (torch.ones_like(nll) if mask is None
                      else (mask[:, 1:] * mask[:, :-1]).to(nll.dtype))
            counts = scored.sum(1)
            sums = (nll * scored).sum(1)
            for s, c in zip(sums.tolist(), counts.tolist()):
                if c:
                    window_means.append(s / c)
            total_nll += float(sums.sum())
            total_tokens += int(counts.sum())
            if progress is not None:
                progress(i)
    if not total_tokens:
        raise SurgeryError("no tokens to score: the text gave no window of at least 2 tokens.")
    mean = total_nll / total_tokens
    n = len(window_means)
    spread = (sum((m - mean) ** 2 for m in window_means) / (n - 1)) ** 0.5 if n > 1 else 0.0
    value = math.exp(mean)
    return Perplexity(value, value * spread / math.sqrt(n), total_tokens, n)


@dataclass(frozen=True)
class GenerationSpeed:
    """Generated tokens per second (median over rounds) per model, and the pruned/dense ratio
    of those rates when both were timed."""

    tokens_per_s: dict[str, float]
    timings: dict[str, Timing]
    speedup: Speedup | None
    new_tokens: int
    batch: int


def generation_speed(models: dict[str, torch.nn.Module], prompt: torch.Tensor, *,
                     new_tokens: int = 32, rounds: int = 5) -> GenerationSpeed:
    """Time greedy generation of exactly ``new_tokens`` after ``prompt`` (``(batch, tokens)``
    ids) with the KV cache, the models interleaved."""

    def generate(model: torch.nn.Module, ids: torch.Tensor) -> Any:
        return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, use_cache=True, pad_token_id=_pad_id(model))

    samples = time_interleaved(models, prompt, rounds=rounds, warmup=1, run=generate)
    timings = {name: Timing.of(s) for name, s in samples.items()}
    made = new_tokens * prompt.shape[0]
    rates = {name: made / (t.median_ms / 1e3) for name, t in timings.items()}
    speedup = (Speedup.of(samples["dense"], samples["pruned"])
               if {"dense", "pruned"} <= set(samples) else None)
    return GenerationSpeed(rates, timings, speedup, new_tokens, int(prompt.shape[0]))


def _pad_id(model: torch.nn.Module) -> int:
    """The pad id generation needs (set, so transformers does not warn it picked one)."""
    config = model.generation_config
    eos = config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    return next((v for v in (config.pad_token_id, eos) if v is not None), 0)
