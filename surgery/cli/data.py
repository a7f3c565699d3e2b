"""DATA specs: the batches a command-line name stands for.

A DATA spec is one of:

* ``fashion-mnist`` (or ``fashion-mnist:train`` / ``fashion-mnist:test``): the built-in real
  data set (:func:`surgery.demo.datasets.fashion_mnist`), padded or resized to the input size;
* a folder of images in ImageFolder layout (``root/CLASS/IMAGE``; ``root/train`` and
  ``root/val`` or ``root/test`` are used for calibration and evaluation when present);
* a ``.csv``, ``.jsonl`` or ``.json`` file of texts with labels (tokenised with the Hugging
  Face folder's tokenizer, or ``tokenizer``);
* a ``.txt`` file of plain text, for a causal language model: cut into non-overlapping
  windows of the sequence length; calibration reads the first 80% of it, evaluation the rest
  (``FILE.txt:all`` reads all of it for both, ``FILE.txt:train`` / ``:test`` one part);
* ``package.module:function``: a callable returning an iterable of batches (``inputs``,
  ``(inputs, labels)`` or dicts with ``labels``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch.utils._pytree import tree_map_only

from surgery._core.batches import rows, split_batch
from surgery.cli.specs import IMAGENET_MEAN, IMAGENET_STD, import_callable
from surgery.errors import LoadError

FASHION_MEAN = 0.286


FASHION_STD = 0.353


TEXT_SUFFIXES = (".csv", ".jsonl", ".json")


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
            n = rows(inputs)
            if self.limit is not None and n and seen + n > self.limit:
                keep = self.limit - seen
                batch = _slice(batch, 0, keep)
                n = keep
            seen += n or 1
            yield batch
            self.samples = seen

    def has_labels(self) -> bool:
        for batch in self:
            return split_batch(batch)[1] is not None
        raise LoadError(f"data {self.name!r} yielded no batches.")


def _slice(value: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every (non-scalar) tensor in a nested batch."""
    return tree_map_only(torch.Tensor, lambda v: v[start:stop] if v.ndim else v, value)


def _tensor_batches(x: Any, y: torch.Tensor | None, batch_size: int, name: str) -> Batches:
    n = len(y) if y is not None else rows(x)

    def make() -> Iterator[Any]:
        for i in range(0, n, batch_size):
            xb = _slice(x, i, i + batch_size)
            yield xb if y is None else (xb, y[i:i + batch_size])

    return Batches(make, name, total=math.ceil(n / batch_size))


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


def text_window_batches(path: str | os.PathLike, split: str, inputs: dict[str, Any],
                        tokenizer: Any, *, batch_size: int, limit: int | None) -> Batches:
    """``{"input_ids"}`` batches of token windows from a plain text file (see the module
    docstring for the split)."""
    from surgery.language import text_split, token_windows

    if inputs.get("kind") != "causal":
        raise LoadError(f"a plain text file ({str(path)!r}) is data for a causal language "
                        "model; this model is not one. Classifiers read .csv/.jsonl files of "
                        "texts with labels.")
    if tokenizer is None:
        raise LoadError(f"text data {str(path)!r} needs a tokenizer: use a model folder that "
                        "has one, or pass --tokenizer FOLDER.")
    text = text_split(Path(path).read_text(encoding="utf-8"), split)
    windows = token_windows(tokenizer, text, int(inputs.get("seq_len", 128)), limit)
    if not len(windows):
        raise LoadError(f"the {split} part of {str(path)!r} is shorter than one window of "
                        f"{inputs.get('seq_len', 128)} tokens; use more text or a smaller "
                        "--seq-len.")

    def make() -> Iterator[Any]:
        for i in range(0, len(windows), batch_size):
            ids = windows[i:i + batch_size]
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    return Batches(make, f"{path}:{split}", total=math.ceil(len(windows) / batch_size))


def function_batches(spec: str, *, limit: int | None) -> Batches:
    fn = import_callable(spec, "DATA")

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
    text_file = re.fullmatch(r"(.+\.txt)(?::(\w+))?", spec)
    if text_file:
        if not Path(text_file[1]).is_file():
            raise LoadError(f"data file {text_file[1]!r} does not exist.")
        return text_window_batches(text_file[1], text_file[2] or split, inputs, tokenizer,
                                   batch_size=batch_size, limit=limit)
    if path.suffix in TEXT_SUFFIXES:
        if not path.is_file():
            raise LoadError(f"data file {spec!r} does not exist.")
        return text_batches(path, inputs, tokenizer, batch_size=batch_size, limit=limit,
                            text_column=text_column, label_column=label_column, label2id=label2id)
    if ":" in spec:
        return function_batches(spec, limit=limit)
    raise LoadError(
        f"data {spec!r} is not 'fashion-mnist', an ImageFolder directory, a .csv/.jsonl file of "
        "texts with labels, a .txt file of text (causal language models), or a "
        "'module:function' yielding batches."
    )
