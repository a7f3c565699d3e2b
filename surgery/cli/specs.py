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

import csv
import importlib
import importlib.util
import json
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from surgery.stats.calibrate import split_batch
from surgery.errors import SurgeryError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MEAN, FASHION_STD = 0.286, 0.353
TEXT_SUFFIXES = (".csv", ".jsonl", ".json")
HF_MISSING = ("Hugging Face support arrives with the BERT/ViT plugins "
              "(surgery_plugins.bert / surgery_plugins.vit are not installed).")


class LoadError(SurgeryError, ValueError):
    """A model, checkpoint, data set or pruned-model folder could not be resolved."""


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


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``.pth``/``.pt``/``.bin``),
    unwrapping ``{"state_dict": ...}`` / ``{"model": ...}`` and a DataParallel ``module.``."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"checkpoint {str(path)!r} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise LoadError(f"cannot read checkpoint {str(path)!r} as a state dict "
                            f"({type(exc).__name__}: {exc}).") from exc
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LoadError(f"checkpoint {str(path)!r} is not a state dict of tensors.")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def load_checkpoint(model: torch.nn.Module, path: str | os.PathLike) -> None:
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        hint = " Pass --num-classes to match the checkpoint's classifier." if wrong else ""
        raise LoadError(
            f"checkpoint {str(path)!r} does not fit {type(model).__name__}: missing "
            f"{missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {wrong[:3]}.{hint}"
        )
    model.load_state_dict(state)


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

class Batches:
    """A re-iterable sequence of batches (each pass starts again), at most ``limit`` samples.

    ``total`` is the number of batches when known (for progress bars)."""

    def __init__(self, make: Callable[[], Iterable[Any]], name: str, *,
                 total: int | None = None, limit: int | None = None) -> None:
        self._make, self.name, self.total, self.limit = make, name, total, limit
        self.samples: int | None = None  # samples yielded by the last complete pass

    def __iter__(self) -> Iterator[Any]:
        seen = 0
        for batch in self._make():
            if self.limit is not None and seen >= self.limit:
                return
            inputs, labels = split_batch(batch)
            n = _rows(inputs)
            if self.limit is not None and n and seen + n > self.limit:
                keep = self.limit - seen
                batch = _cut(batch, keep)
                n = keep
            seen += n or 1
            yield batch
            self.samples = seen

    def has_labels(self) -> bool:
        for batch in self:
            return split_batch(batch)[1] is not None
        raise LoadError(f"data {self.name!r} yielded no batches.")


def _rows(inputs: Any) -> int:
    from surgery._core.batches import first_tensor

    t = first_tensor(inputs)
    return int(t.shape[0]) if t is not None and t.ndim else 0


def _cut(value: Any, n: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[:n] if value.ndim else value
    if isinstance(value, dict):
        return {k: _cut(v, n) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_cut(v, n) for v in value)
    return value


def _tensor_batches(x: Any, y: torch.Tensor | None, batch_size: int, name: str) -> Batches:
    n = len(y) if y is not None else _rows(x)

    def make() -> Iterator[Any]:
        for i in range(0, n, batch_size):
            xb = _cut_range(x, i, i + batch_size)
            yield xb if y is None else (xb, y[i:i + batch_size])

    return Batches(make, name, total=math.ceil(n / batch_size))


def _cut_range(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _cut_range(v, start, stop) for k, v in value.items()}
    return value


def _image_shape(inputs: dict[str, Any]) -> tuple[int, int, int]:
    if inputs.get("kind") != "image":
        raise LoadError("image data needs a model that takes images (pass --input-size C,H,W).")
    shape = tuple(inputs["shape"])
    if len(shape) != 3:
        raise LoadError(f"image data needs an input size C,H,W; got {shape}.")
    return shape  # type: ignore[return-value]


def _wrap_images(x: torch.Tensor, inputs: dict[str, Any]) -> Any:
    return {inputs["key"]: x} if inputs.get("key") else x


def fashion_mnist_batches(split: str, inputs: dict[str, Any], *, batch_size: int,
                          limit: int | None) -> Batches:
    """Fashion-MNIST as ``(images, labels)`` batches shaped for the model: padded to the input
    size when it is at most 8 px larger than 28 (the demo's 32x32), resized otherwise, repeated
    to C channels, normalised with the data set's mean and std."""
    import torch.nn.functional as F

    from surgery.demo.datasets import fashion_mnist

    c, h, w = _image_shape(inputs)
    x, y = fashion_mnist(split)
    if split == "train" and limit is not None:
        x, y = x[-limit:], y[-limit:]  # the demo's calibration slice: the end of train
    elif limit is not None:
        x, y = x[:limit], y[:limit]
    x = x.float().div(255).sub(FASHION_MEAN).div(FASHION_STD).unsqueeze(1)
    if 28 <= h <= 36 and 28 <= w <= 36:
        top, left = (h - 28) // 2, (w - 28) // 2
        x = F.pad(x, (left, w - 28 - left, top, h - 28 - top))
    else:
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    x = x.repeat(1, c, 1, 1)
    return _tensor_batches(_wrap_images(x, inputs), y, batch_size, f"fashion-mnist:{split}")


def image_folder_batches(root: str | os.PathLike, split: str, inputs: dict[str, Any], *,
                         batch_size: int, limit: int | None, resize: int | None = None,
                         mean: tuple[float, ...] | None = None,
                         std: tuple[float, ...] | None = None,
                         seed: int = 0) -> Batches:
    """``(images, labels)`` batches from an ImageFolder tree: resize the shorter side to
    ``resize`` (default: the input height), centre-crop to the input size, normalise. A seeded
    random subset of ``limit`` images (ImageFolder lists images class by class)."""
    import torchvision.transforms as T
    from torchvision.datasets import ImageFolder

    c, h, w = _image_shape(inputs)
    root = Path(root)
    for name in ((split,) if split == "train" else ("val", "validation", "test")):
        if (root / name).is_dir():
            root = root / name
            break
    mean = tuple(mean or inputs.get("mean") or IMAGENET_MEAN)
    std = tuple(std or inputs.get("std") or IMAGENET_STD)
    if len(mean) != c:
        mean, std = (mean[:1] * c, std[:1] * c) if len(mean) == 1 or c != 3 else (mean, std)
    steps = [T.Grayscale(c)] if c == 1 else [T.Lambda(lambda im: im.convert("RGB"))]
    steps += [T.Resize(resize or max(h, w)), T.CenterCrop((h, w)), T.ToTensor(),
              T.Normalize(mean[:c], std[:c])]
    try:
        dataset = ImageFolder(str(root), transform=T.Compose(steps))
    except (FileNotFoundError, RuntimeError) as exc:
        raise LoadError(f"{str(root)!r} is not an ImageFolder tree (root/CLASS/IMAGE): "
                        f"{exc}") from exc
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    if limit is not None:
        order = order[:limit]
    order = order.tolist()

    def make() -> Iterator[Any]:
        for i in range(0, len(order), batch_size):
            items = [dataset[j] for j in order[i:i + batch_size]]
            x = torch.stack([im for im, _ in items])
            yield _wrap_images(x, inputs), torch.tensor([lab for _, lab in items])

    return Batches(make, str(root), total=math.ceil(len(order) / batch_size))


def read_text_rows(path: str | os.PathLike, *, text_column: str | None = None,
                   label_column: str = "label") -> list[dict[str, Any]]:
    """Rows of a CSV (header line) or JSON lines / JSON list file, as dicts with ``text``,
    optionally ``text_pair``, and ``label`` (as read: int when it looks like one)."""
    path = Path(path)
    if path.suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            raw = list(csv.DictReader(f))
    else:
        text = path.read_text(encoding="utf-8")
        try:
            raw = (json.loads(text) if path.suffix == ".json"
                   else [json.loads(line) for line in text.splitlines() if line.strip()])
        except json.JSONDecodeError as exc:
            raise LoadError(f"{str(path)!r} is not valid JSON lines: {exc}") from exc
    if not raw:
        raise LoadError(f"{str(path)!r} has no rows.")
    columns = list(raw[0])
    first = text_column or next((c for c in ("text", "sentence", "sentence1", "question")
                                 if c in columns), None)
    if first is None or first not in columns:
        raise LoadError(f"{str(path)!r} has no text column (columns: {columns}); name it 'text' "
                        "or pass --text-column.")
    second = next((c for c in ("text_pair", "sentence2") if c in columns), None)
    rows = []
    for i, r in enumerate(raw):
        row: dict[str, Any] = {"text": str(r[first])}
        if second:
            row["text_pair"] = str(r[second])
        if label_column in r and r[label_column] not in (None, ""):
            value = r[label_column]
            try:
                value = int(value)
            except (TypeError, ValueError):
                value = str(value)
            row["label"] = value
        rows.append(row)
    return rows


def label_ids(rows: list[dict[str, Any]],
              label2id: dict[str, int] | None = None) -> list[int] | None:
    """Integer class ids for the rows' labels (names mapped by ``label2id`` or sorted order)."""
    labels = [r.get("label") for r in rows]
    if any(v is None for v in labels):
        return None
    if all(isinstance(v, int) for v in labels):
        return labels  # type: ignore[return-value]
    names = sorted({str(v) for v in labels})
    mapping = dict(label2id) if label2id and all(n in label2id for n in names) else \
        {n: i for i, n in enumerate(names)}
    return [int(mapping[str(v)]) for v in labels]


def text_batches(path: str | os.PathLike, inputs: dict[str, Any], tokenizer: Any, *,
                 batch_size: int, limit: int | None, text_column: str | None = None,
                 label_column: str = "label", label2id: dict[str, int] | None = None) -> Batches:
    """Dict batches (the tokenizer's tensors padded to the sequence length, plus ``labels``)."""
    if tokenizer is None:
        raise LoadError(f"text data {str(path)!r} needs a tokenizer: use a Hugging Face model "
                        "folder that has one, or pass --tokenizer FOLDER.")
    rows = read_text_rows(path, text_column=text_column, label_column=label_column)
    if limit is not None:
        rows = rows[:limit]
    labels = label_ids(rows, label2id)
    keys = inputs.get("keys") or ["input_ids", "attention_mask"]
    seq_len = int(inputs.get("seq_len", 128))

    def make() -> Iterator[Any]:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            pair = [r["text_pair"] for r in chunk] if "text_pair" in chunk[0] else None
            enc = tokenizer([r["text"] for r in chunk], pair, padding="max_length",
                            truncation=True, max_length=seq_len, return_tensors="pt")
            batch = {k: enc[k] for k in keys if k in enc}
            if labels is not None:
                batch["labels"] = torch.tensor(labels[i:i + batch_size], dtype=torch.long)
            yield batch

    return Batches(make, str(path), total=math.ceil(len(rows) / batch_size))


def function_batches(spec: str, *, limit: int | None) -> Batches:
    fn = _import_attr(spec, "DATA")

    def make() -> Iterable[Any]:
        data = fn()
        try:
            return iter(data)
        except TypeError as exc:
            raise LoadError(f"{spec!r} returned {type(data).__name__}, not an iterable of "
                            "batches.") from exc

    total = None
    return Batches(make, spec, total=total, limit=limit)


def load_data(
    spec: str,
    inputs: dict[str, Any],
    *,
    split: str = "train",
    batch_size: int = 64,
    limit: int | None = None,
    tokenizer: Any = None,
    resize: int | None = None,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    text_column: str | None = None,
    label_column: str = "label",
    label2id: dict[str, int] | None = None,
) -> Batches:
    """Resolve a DATA spec (see the module docstring). ``split`` is ``train`` for calibration,
    ``test`` for evaluation; a split in the spec (``fashion-mnist:test``) wins."""
    if batch_size < 1:
        raise LoadError(f"batch size must be >= 1, got {batch_size}.")
    path = Path(spec)
    if spec == "fashion-mnist" or spec.startswith("fashion-mnist:"):
        chosen = spec.partition(":")[2] or split
        if chosen not in ("train", "test"):
            raise LoadError(f"fashion-mnist split must be train or test, got {chosen!r}.")
        return fashion_mnist_batches(chosen, inputs, batch_size=batch_size, limit=limit)
    if path.is_dir():
        return image_folder_batches(path, split, inputs, batch_size=batch_size, limit=limit,
                                    resize=resize, mean=mean, std=std)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise LoadError(f"data file {spec!r} does not exist.")
        return text_batches(path, inputs, tokenizer, batch_size=batch_size, limit=limit,
                            text_column=text_column, label_column=label_column, label2id=label2id)
    if ":" in spec:
        return function_batches(spec, limit=limit)
    raise LoadError(
        f"data {spec!r} is not 'fashion-mnist', an ImageFolder directory, a .csv/.jsonl file of "
        "texts with labels, or a 'module:function' yielding batches."
    )


# ---- pruned-model folders -------------------------------------------------------------------

SOURCE_FILE = "source.json"
"""Beside :mod:`surgery.io`'s files: where the dense model came from (checkpoint, seed) and how
its inputs look and are preprocessed, so ``eval``/``bench``/``export`` feed it like ``prune``."""


def factory_model(factory: str, **kwargs: Any) -> torch.nn.Module:
    """Call the ``module:callable`` ``factory`` and return the model alone (factories may return
    ``(model, example_inputs)``): the architecture :mod:`surgery.io` rebuilds factories with."""
    result = _import_attr(factory, "MODEL")(**kwargs)
    return result[0] if isinstance(result, tuple) else result


def architecture(loaded: Loaded) -> Any:
    """The :class:`surgery.io.Architecture` that rebuilds ``loaded``'s unpruned model."""
    from surgery.io import Architecture

    recipe = loaded.recipe
    kwargs = {"num_classes": recipe["num_classes"]} if recipe.get("num_classes") is not None else {}
    if recipe["source"] == "huggingface":
        return Architecture.transformers(loaded.model)
    if recipe["source"] == "timm":
        return Architecture.timm(recipe["name"], **kwargs)
    if recipe["source"] == "torchvision":
        return Architecture.torchvision(recipe["name"], **kwargs)
    return Architecture.factory("surgery.cli.specs:factory_model", factory=recipe["name"], **kwargs)


def save_pruned(folder: str | os.PathLike, loaded: Loaded, pruned: torch.nn.Module,
                plan: Any) -> None:
    """Write a pruned model into ``folder`` (replaced whole): :func:`surgery.io.save`'s files
    plus ``source.json``. ``loaded.model`` must still be the unpruned model.

    This and :func:`load_pruned` are the only code that knows the folder's layout."""
    import surgery.io

    if any(p.is_cuda for p in pruned.parameters()):
        pruned = pruned.cpu()
    with warnings.catch_warnings():  # io.save builds the base on the meta device: a factory
        warnings.simplefilter("ignore", UserWarning)  # that loads weights warns of no-op copies
        surgery.io.save(pruned, folder, plan, architecture(loaded), overwrite=True)
    (Path(folder) / SOURCE_FILE).write_text(json.dumps(
        {"recipe": loaded.recipe, "inputs": loaded.inputs}, indent=1))


@dataclass
class PrunedFolder:
    """A folder written by ``surgery prune``: the pruned model, its plan, and the dense one's
    recipe (rebuilt on demand)."""

    path: Path
    model: torch.nn.Module
    plan: Any
    recipe: dict[str, Any]
    inputs: dict[str, Any]
    example: Any = None

    def example_inputs(self, batch: int = 1) -> Any:
        return make_example(self.inputs, batch, self.example)

    def dense(self) -> torch.nn.Module:
        """The dense model the plan was made from (checkpoint or seeded initialisation)."""
        ckpt = self.recipe.get("checkpoint")
        if ckpt and not Path(ckpt).exists():
            raise LoadError(f"the dense model's checkpoint {ckpt!r} is gone; cannot compare.")
        return build_model(self.recipe)[0]

    def tokenizer(self) -> Any:
        folder = self.inputs.get("tokenizer")
        return load_tokenizer(folder) if folder else None


def load_pruned(folder: str | os.PathLike, device: str = "cpu") -> PrunedFolder:
    """The pruned model in ``folder`` (:func:`surgery.io.load`), its plan and its source."""
    import surgery.io

    folder = Path(folder)
    meta_path = folder / SOURCE_FILE
    if not folder.is_dir() or not meta_path.is_file():
        raise LoadError(f"{str(folder)!r} is not a folder written by 'surgery prune' (no "
                        f"{SOURCE_FILE}); make one with 'surgery prune MODEL --out DIR'.")
    meta = json.loads(meta_path.read_text())
    if os.getcwd() not in sys.path:  # factories named relative to the current directory
        sys.path.insert(0, os.getcwd())
    model = surgery.io.load(folder, device=device)
    plan = surgery.io.load_plan(folder)
    example = build_model(meta["recipe"])[1] if meta["inputs"]["kind"] == "factory" else None
    return PrunedFolder(folder, model, plan, meta["recipe"], meta["inputs"], example)
