"""Helpers shared by the benchmark scripts: tables, writing results to docs/, peak memory."""

from __future__ import annotations

import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def machine() -> str:
    return (f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, torch {torch.__version__}, Python {platform.python_version()}")


def write_result(name: str, title: str, body: str) -> Path:
    """Write ``docs/benchmarks/<name>.md`` atomically and print it."""
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / f"{name}.md"
    text = f"# {title}\n\n{body}\n"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    print(text)
    print(f"[written to {path}]")
    return path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, *args: str) -> dict:
    """Run ``script`` in a fresh interpreter (clean peak-memory counter); it prints one JSON
    line last."""
    out = subprocess.run([sys.executable, script, *args], check=True, capture_output=True,
                         text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def tp_heads(model) -> dict:
    """Attention heads declared to Torch-Pruning as its examples do (timm: ``qkv`` with
    ``num_heads``; Hugging Face: ``query``/``key``/``value`` with ``num_attention_heads``)."""
    import torch.nn as nn

    heads = {}
    for m in model.modules():
        n = getattr(m, "num_heads", None) or getattr(m, "num_attention_heads", None) \
            or getattr(m, "n_heads", None)
        if not isinstance(n, int):
            continue
        for child in ("qkv", "query", "key", "value", "q_proj", "k_proj", "v_proj", "q_lin",
                      "k_lin", "v_lin", "q", "k", "v"):
            layer = getattr(m, child, None)
            if isinstance(layer, nn.Linear):
                heads[layer] = n
    return heads


def tp_fix_heads(model, pruner, heads: dict) -> None:
    """After ``step()``: head counts and sizes as Torch-Pruning's timm and BERT examples set them."""
    for m in model.modules():
        for child in ("qkv", "query", "q_proj", "q_lin", "q"):
            layer = getattr(m, child, None)
            if layer is None or layer not in heads:
                continue
            n = pruner.num_heads.get(layer, heads[layer])
            width = layer.out_features // (3 if child == "qkv" else 1)
            for attr in ("num_heads", "num_attention_heads", "n_heads"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, n)
            for attr in ("head_dim", "attention_head_size", "dim_per_head"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, width // n)
            for attr in ("all_head_size", "attn_dim"):
                if isinstance(getattr(m, attr, None), int):
                    setattr(m, attr, width)
            break
