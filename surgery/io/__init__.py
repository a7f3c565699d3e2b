"""Saving and reloading pruned models (safetensors + plan, no pickle), checkpoints, ONNX."""

from surgery.io.architecture import Architecture, architecture_of
from surgery.io.folder import load, load_plan, read_manifest, save

__all__ = ["Architecture", "architecture_of", "save", "load", "load_plan", "read_manifest"]
