"""Saving and reloading pruned models, ONNX export."""

from surgery.io.folder import (Architecture, architecture_of, load, load_plan, read_manifest,
                               save)

__all__ = ["Architecture", "architecture_of", "save", "load", "load_plan", "read_manifest"]
