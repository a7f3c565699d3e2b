"""Where surgery keeps what it makes once and reuses (trained demo models, GGUF conversions):
``$SURGERY_CACHE``, else ``~/.cache/surgery``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("SURGERY_CACHE", Path.home() / ".cache" / "surgery"))
