"""Resolving what the command line names: models, data sets, and pruned-model folders.

A MODEL spec is one of (tried in this order):

* a local folder with a ``config.json``: a Hugging Face model (needs the BERT/ViT plugins);
* ``timm:NAME`` / ``torchvision:NAME``: that library's model, explicitly;
* ``package.module:factory``: any Python callable returning a model, or ``(model,
  example_inputs)`` (the current directory is importable);
* a torchvision model name (``resnet18``), then a timm model name (``resnet50d``).

Weights come from ``checkpoint`` (``.safetensors``, or a ``.pth``/``.pt``/``.bin`` state
dict); without one, models are randomly initialised under a fixed seed (so the same dense
model can be rebuilt later), except Hugging Face folders and factories, which bring their own.

A DATA spec is one of:

* ``fashion-mnist`` (or ``fashion-mnist:train`` / ``fashion-mnist:test``): the built-in real
  data set (:func:`surgery.datasets.fashion_mnist`), padded or resized to the input size;
* a folder of images in ImageFolder layout (``root/CLASS/IMAGE``; ``root/train`` and
  ``root/val`` or ``root/test`` are used for calibration and evaluation when present);
* a ``.csv``, ``.jsonl`` or ``.json`` file of texts with labels (tokenised with the Hugging
  Face folder's tokenizer, or ``tokenizer``);
* ``package.module:function``: a callable returning an iterable of batches (``inputs``,
  ``(inputs, labels)`` or dicts with ``labels``).

A pruned-model folder (what ``surgery prune`` writes) is read and written by
:func:`save_pruned` / :func:`load_pruned`, the one place that knows its file layout.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from surgery.errors import LoadError
from surgery.io.checkpoint import load_checkpoint

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_MISSING = ("Hugging Face support arrives with the BERT/ViT plugins "
              "(surgery_plugins.bert / surgery_plugins.vit are not installed).")


# ---- models ---------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A model ready to prune, with everything needed to rebuild it and to feed it.

    ``recipe`` rebuilds the dense model (JSON-able: source, name, checkpoint, seed ...);
    ``inputs`` describes its inputs and preprocessing (``kind`` image/text/factory, shape,
    mean/std, sequence length, tokenizer folder) so later commands feed data the same way."""

    model: torch.nn.Module
    recipe: dict[str, Any]
    inputs: dict[str, Any]
    example: Any = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    def example_inputs(self, batch: int = 1) -> Any:
        return make_example(self.inputs, batch, self.example)


def parse_size(text: str | None) -> tuple[int, ...] | None:
    """``"3,224,224"`` (or ``3x224x224``) -> ``(3, 224, 224)``."""
    if text is None or text == "":
        return None
    try:
        size = tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError as exc:
        raise LoadError(f"input size {text!r} is not a list of integers like 3,224,224.") from exc
    if not size or min(size) < 1:
        raise LoadError(f"input size {text!r} must be positive integers like 3,224,224.")
    return size


def _seeded(seed: int, build: Callable[[], Any]) -> Any:
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build()
    finally:
        torch.random.set_rng_state(state)


def _import_attr(spec: str, what: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise LoadError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}. The module "
                        "must be importable (installed, or under the current directory).") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise LoadError(f"{module_name!r} has no attribute {attr!r} (from {what} {spec!r}).")
        obj = getattr(obj, part)
    if not callable(obj):
        raise LoadError(f"{spec!r} is not callable; {what} must name a function or class.")
    return obj


def is_hf_folder(spec: str) -> bool:
    return Path(spec).is_dir() and (Path(spec) / "config.json").exists()


def hf_plugins_available() -> bool:
    try:
        return importlib.util.find_spec("surgery_plugins.hf_encoders") is not None
    except ImportError:
        return False


def _model_kind(spec: str) -> tuple[str, str]:
    """(source, name) for a model spec; see the module docstring for the order."""
    if Path(spec).is_dir():
        if not is_hf_folder(spec):
            raise LoadError(f"{spec!r} is a folder without config.json; a model folder must be a "
                            "Hugging Face save_pretrained folder.")
        return "huggingface", str(Path(spec).resolve())
    for prefix in ("timm", "torchvision"):
        if spec.startswith(prefix + ":"):
            return prefix, spec[len(prefix) + 1:]
    if ":" in spec:
        return "factory", spec
    import torchvision

    if spec in torchvision.models.list_models():
        return "torchvision", spec
    import timm

    if timm.is_model(spec):
        return "timm", spec
    raise LoadError(
        f"{spec!r} is not a torchvision or timm model name, a Hugging Face folder, or a "
        "'module:factory' callable. List names with timm.list_models() / "
        "torchvision.models.list_models()."
    )


def build_model(recipe: dict[str, Any], *, weights: bool = True) -> tuple[torch.nn.Module, Any]:
    """The dense model a recipe describes, and the factory's example inputs (or None).

    ``weights=False`` skips the checkpoint (the caller loads pruned weights instead)."""
    source, name = recipe["source"], recipe["name"]
    num_classes = recipe.get("num_classes")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    example = None
    if source == "huggingface":
        model = _hf_model(name)
    elif source == "factory":
        result = _seeded(recipe.get("seed", 0), lambda: _import_attr(name, "MODEL")(**kwargs))
        pair = isinstance(result, tuple) and len(result) == 2
        if pair and isinstance(result[0], torch.nn.Module):
            model, example = result
        else:
            model = result
        if not isinstance(model, torch.nn.Module):
            raise LoadError(f"factory {name!r} returned {type(model).__name__}, not an nn.Module "
                            "(or a (model, example_inputs) pair).")
    elif source == "torchvision":
        import torchvision

        model = _seeded(recipe.get("seed", 0), lambda: torchvision.models.get_model(name, **kwargs))
    elif source == "timm":
        import timm

        try:
            model = _seeded(recipe.get("seed", 0),
                            lambda: timm.create_model(name, pretrained=False, **kwargs))
        except RuntimeError as exc:
            raise LoadError(f"timm cannot build {name!r}: {exc}") from exc
    else:
        raise LoadError(f"unknown model source {source!r} in the recipe.")
    if weights and recipe.get("checkpoint"):
        load_checkpoint(model, recipe["checkpoint"])
    return model.float().eval(), example


def _hf_model(folder: str) -> torch.nn.Module:
    if not hf_plugins_available():
        raise LoadError(HF_MISSING)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    cls = next((c for c in classes if c is not None), transformers.AutoModel)
    try:
        return cls.from_pretrained(folder, dtype=torch.float32)
    except Exception as exc:
        raise LoadError(f"transformers cannot load {folder!r} with {cls.__name__}: {exc}") from exc


def load_model(
    spec: str,
    *,
    checkpoint: str | os.PathLike | None = None,
    input_size: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    seq_len: int = 128,
    tokenizer: str | None = None,
    seed: int = 0,
) -> Loaded:
    """Resolve a MODEL spec (see the module docstring) into a :class:`Loaded`."""
    source, name = _model_kind(spec)
    recipe: dict[str, Any] = {"source": source, "name": name, "seed": seed}
    if num_classes is not None:
        recipe["num_classes"] = num_classes
    if checkpoint:
        recipe["checkpoint"] = str(Path(checkpoint).resolve())
    model, example = build_model(recipe)
    tok = None
    if source == "huggingface":
        inputs = _hf_inputs(model, name, seq_len, tokenizer, input_size)
        if inputs["kind"] == "text" and inputs.get("tokenizer"):
            tok = load_tokenizer(inputs["tokenizer"])
    elif example is not None:
        inputs = {"kind": "factory"}
        if input_size is not None:
            inputs = {"kind": "image", "shape": list(input_size),
                      "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
            example = None
    else:
        cfg = getattr(model, "pretrained_cfg", None) or {}
        shape = input_size or (tuple(cfg["input_size"]) if cfg.get("input_size") else None)
        if shape is None:
            if source == "factory":
                raise LoadError(f"factory {name!r} returned a bare model: pass --input-size "
                                "(e.g. 3,32,32), or return (model, example_inputs).")
            shape = (3, 224, 224)
        inputs = {"kind": "image", "shape": list(shape),
                  "mean": list(cfg.get("mean", IMAGENET_MEAN)),
                  "std": list(cfg.get("std", IMAGENET_STD))}
    return Loaded(model, recipe, inputs, example, tok)


def _hf_inputs(model: torch.nn.Module, folder: str, seq_len: int, tokenizer: str | None,
               input_size: tuple[int, ...] | None) -> dict[str, Any]:
    config = model.config
    if getattr(config, "image_size", None) is not None and getattr(config, "num_channels", None):
        size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
        shape = input_size or (config.num_channels, size, size)
        return {"kind": "image", "key": "pixel_values", "shape": list(shape),
                "mean": [0.5] * shape[0], "std": [0.5] * shape[0]}
    tok_folder = tokenizer or (folder if _has_tokenizer(folder) else None)
    keys = ["input_ids", "attention_mask"]
    if tok_folder:
        keys = [k for k in load_tokenizer(tok_folder).model_input_names
                if k in ("input_ids", "attention_mask", "token_type_ids")]
    return {"kind": "text", "seq_len": seq_len, "keys": keys,
            "vocab_size": int(getattr(config, "vocab_size", 100) or 100),
            "tokenizer": str(Path(tok_folder).resolve()) if tok_folder else None}


def _has_tokenizer(folder: str) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")
    return any((Path(folder) / n).exists() for n in names)


def load_tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise LoadError(f"cannot load a tokenizer from {folder!r}: {exc}") from exc


def resize_batch(value: Any, batch: int) -> Any:
    """Every tensor in a nested value cycled/cut along dim 0 to ``batch`` rows."""
    if isinstance(value, torch.Tensor):
        if value.ndim == 0:
            return value
        idx = torch.arange(batch) % value.shape[0]
        return value.index_select(0, idx.to(value.device))
    if isinstance(value, dict):
        return {k: resize_batch(v, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(resize_batch(v, batch) for v in value)
    return value


def make_example(inputs: dict[str, Any], batch: int = 1, factory_example: Any = None,
                 seed: int = 1) -> Any:
    """Example inputs of ``batch`` rows for a model described by ``inputs`` (see Loaded)."""
    g = torch.Generator().manual_seed(seed)
    kind = inputs["kind"]
    if kind == "factory":
        if factory_example is None:
            raise LoadError("the factory's example inputs are missing; rebuild the model first.")
        return resize_batch(factory_example, batch)
    if kind == "image":
        x = torch.randn(batch, *inputs["shape"], generator=g)
        return {inputs["key"]: x} if inputs.get("key") else x
    if kind == "text":
        n = inputs["seq_len"]
        ids = torch.randint(5, max(6, inputs.get("vocab_size", 100)), (batch, n), generator=g)
        out = {"input_ids": ids}
        for k in inputs.get("keys", ["input_ids", "attention_mask"]):
            if k == "attention_mask":
                out[k] = torch.ones(batch, n, dtype=torch.long)
            elif k == "token_type_ids":
                out[k] = torch.zeros(batch, n, dtype=torch.long)
        return out
    raise LoadError(f"unknown input kind {kind!r}.")


# ---- data -----------------------------------------------------------------------------------


# ---- pruned-model folders -------------------------------------------------------------------


