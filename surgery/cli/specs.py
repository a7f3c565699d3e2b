"""MODEL specs: the models a command-line name stands for, and how to rebuild and feed them.

A MODEL spec is one of (tried in this order):

* a local folder with a ``config.json``: a Hugging Face model (needs the built-in plugins);
* a ``.gguf`` file: a causal language model, converted once into a Hugging Face folder in the
  cache (:mod:`surgery.io.gguf`; needs the ``llm`` extra);
* ``timm:NAME`` / ``torchvision:NAME``: that library's model, explicitly;
* ``package.module:factory``: any Python callable returning a model, or ``(model,
  example_inputs)`` (the current directory is importable);
* a torchvision model name (``resnet18``), then a timm model name (``resnet50d``).

Weights come from ``checkpoint`` (``.safetensors``, or a ``.pth``/``.pt``/``.bin`` state
dict); without one, models are randomly initialised under a fixed seed (so the same dense
model can be rebuilt later), except Hugging Face folders and factories, which bring their own.
DATA specs are :mod:`surgery.cli.data`.
"""

from __future__ import annotations

import importlib.util
import os
import pkgutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_map_only

from surgery.errors import LoadError
from surgery.io.checkpoint import load_checkpoint
from surgery.language import is_causal_lm

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HF_MISSING = ("Hugging Face support arrives with the BERT/ViT plugins "
              "(surgery_plugins.hf_encoders is not installed).")


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


def import_callable(spec: str, what: str) -> Callable[..., Any]:
    """The callable a ``package.module:name`` spec names (``pkgutil.resolve_name``); the
    current directory is importable, so a user's own module next to their data works."""
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = pkgutil.resolve_name(spec)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LoadError(f"cannot resolve {what} {spec!r}: {type(exc).__name__}: {exc}. The "
                        "module must be importable (installed, or under the current directory) "
                        "and define that name.") from exc
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
    if spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise LoadError(f"GGUF file {spec!r} does not exist.")
        return "gguf", str(Path(spec).resolve())
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


ModelSource = Callable[[str, dict[str, Any]], "tuple[torch.nn.Module, Any]"]
SOURCES: dict[str, ModelSource] = {}
"""Builders by recipe source, filled by :func:`source` below: ``build(name, kwargs)`` returns
the model and the factory's example inputs (None for the others)."""


def source(name: str) -> Callable[[ModelSource], ModelSource]:
    """Decorator: the builder of recipes whose ``source`` is ``name``."""

    def add(build: ModelSource) -> ModelSource:
        SOURCES[name] = build
        return build

    return add


def build_model(recipe: dict[str, Any], *, weights: bool = True) -> tuple[torch.nn.Module, Any]:
    """The dense model a recipe describes, and the factory's example inputs (or None); built
    under the recipe's seed without touching the caller's random state.

    ``weights=False`` skips the checkpoint (the caller loads pruned weights instead)."""
    build = SOURCES.get(recipe["source"])
    if build is None:
        raise LoadError(f"unknown model source {recipe['source']!r} in the recipe; known: "
                        f"{sorted(SOURCES)}.")
    num_classes = recipe.get("num_classes")
    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.get("seed", 0))
        model, example = build(recipe["name"], kwargs)
    if weights and recipe.get("checkpoint"):
        load_checkpoint(model, recipe["checkpoint"])
    return model.float().eval(), example


@source("factory")
def _factory(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    result = import_callable(name, "MODEL")(**kwargs)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module):
        return result
    if not isinstance(result, torch.nn.Module):
        raise LoadError(f"factory {name!r} returned {type(result).__name__}, not an nn.Module "
                        "(or a (model, example_inputs) pair).")
    return result, None


@source("torchvision")
def _torchvision(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    import torchvision

    return torchvision.models.get_model(name, **kwargs), None


@source("timm")
def _timm(name: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    import timm

    try:
        return timm.create_model(name, pretrained=False, **kwargs), None
    except RuntimeError as exc:
        raise LoadError(f"timm cannot build {name!r}: {exc}") from exc


@source("gguf")
def _gguf_model(path: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    return _hf_model(str(_converted(path)), kwargs)


@source("huggingface")
def _hf_model(folder: str, kwargs: dict[str, Any]) -> tuple[torch.nn.Module, Any]:
    if not hf_plugins_available():
        raise LoadError(HF_MISSING)
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder)
    classes = [getattr(transformers, a, None) for a in (config.architectures or [])]
    cls = next((c for c in classes if c is not None), transformers.AutoModel)
    try:
        return cls.from_pretrained(folder, dtype=torch.float32), None
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
    if source in ("huggingface", "gguf"):
        folder = name if source == "huggingface" else str(_converted(name))
        inputs = _hf_inputs(model, folder, seq_len, tokenizer, input_size)
        if inputs["kind"] in ("text", "causal") and inputs.get("tokenizer"):
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
    loaded = Loaded(model, recipe, inputs, example, tok)
    _check_runs(spec, loaded)
    return loaded


def _check_runs(spec: str, loaded: Loaded) -> None:
    """Run the model once on a one-sample example, so that inputs it cannot take are refused
    here with what to change, not deep inside a measurement."""
    from surgery._core.batches import call
    from surgery._core.modes import evaluating

    example = loaded.example_inputs(1)
    try:
        with evaluating(loaded.model), torch.no_grad():
            call(loaded.model, example)
    except Exception as exc:
        what = str(exc).split("\n")[0]
        shape = (f"input size {'x'.join(map(str, loaded.inputs['shape']))}"
                 if loaded.inputs["kind"] == "image" else f"{loaded.inputs['kind']} inputs")
        raise LoadError(
            f"{spec} does not run on {shape}: {type(exc).__name__}: {what}. Pass the input "
            "size the model takes (--input-size C,H,W; --seq-len for text models)."
        ) from exc


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
    return {"kind": "causal" if is_causal_lm(model) else "text", "seq_len": seq_len,
            "keys": keys,
            "vocab_size": int(getattr(config, "vocab_size", 100) or 100),
            "tokenizer": str(Path(tok_folder).resolve()) if tok_folder else None}


def _converted(gguf: str) -> Path:
    from surgery.io.gguf import converted_folder

    return converted_folder(gguf)


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
    return tree_map_only(torch.Tensor, lambda v: v if v.ndim == 0 else v.index_select(
        0, (torch.arange(batch) % v.shape[0]).to(v.device)), value)


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
    if kind in ("text", "causal"):
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




