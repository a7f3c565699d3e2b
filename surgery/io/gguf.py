"""GGUF files as Hugging Face folders.

A GGUF file (llama.cpp's format, how many small LLMs ship) is read by transformers' GGUF
reader, which de-quantises it to float32 (it needs ``gguf`` and ``accelerate``, the ``llm``
extra). A model loaded that way refuses ``save_pretrained`` and takes a minute to load, so it
is converted once into an ordinary Hugging Face folder (weights moved into a fresh model of
the same config, the tokenizer beside them) in the cache and read from there afterwards:
every later command, and a pruned folder's recipe, then loads a plain folder.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

import torch

from surgery._core.cache import cache_root
from surgery.errors import AssetMissing, LoadError
from surgery.io._atomic import atomic_folder

LLM_EXTRA = "pip install 'model-surgery[llm]'"


def converted_folder(gguf: str | os.PathLike, folder: str | os.PathLike | None = None,
                     log: Callable[[str], None] = print) -> Path:
    """The Hugging Face folder for ``gguf``, converting it first unless it is there already.

    ``folder`` defaults to one in the cache named after the file and keyed by its path, size
    and modification time (a changed file is converted again)."""
    gguf = Path(gguf).resolve()
    if not gguf.is_file():
        raise LoadError(f"GGUF file {str(gguf)!r} does not exist.")
    if folder is None:
        stat = gguf.stat()
        key = hashlib.sha256(f"{gguf}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()
        folder = cache_root() / "gguf" / f"{gguf.stem}-{key[:12]}"
    folder = Path(folder)
    if (folder / "config.json").exists():
        return folder
    try:
        import accelerate  # noqa: F401  (transformers' GGUF reader needs both)
        import gguf as _gguf  # noqa: F401
    except ImportError as exc:
        raise AssetMissing(f"reading GGUF needs gguf and accelerate. Install them with:\n"
                           f"    {LLM_EXTRA}") from exc
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"converting {gguf.name} into a Hugging Face folder (once) in {folder}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      dtype=torch.float32)
    except Exception as exc:
        raise LoadError(f"transformers cannot read {gguf.name} as a causal language model: "
                        f"{type(exc).__name__}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())
    with atomic_folder(folder, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return folder
