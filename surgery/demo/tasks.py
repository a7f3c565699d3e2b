"""The README's main job: prune a real trained network on real data and show what changed.

The default is the real all-MiniLM-L6-v2, fine-tuned on real Rotten Tomatoes critic snippets
(once, cached: no model hub here), written out as an ordinary Hugging Face folder with its
train/test texts as JSON lines, and pruned through ``surgery prune`` like any user's model:
half of the encoder's parameters, by top-down mutual information, with the report. The
ResNet-18 on Fashion-MNIST task (``surgery demo resnet18``) is the convolutional example.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from surgery._core.cache import cache_root
from surgery.demo.datasets import fashion_mnist

CACHE = cache_root()


def prepare(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> normalised float [N, 3, 32, 32] (padded, three channels)."""
    x = images.float().div(255).sub(0.286).div(0.353).unsqueeze(1)
    return F.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)


def resnet18_fashion(train_images: int = 12000, epochs: int = 1, seed: int = 0,
                     log: Callable[[str], None] = print) -> torch.nn.Module:
    """A ResNet-18 trained on Fashion-MNIST, from the cache or trained now (about a minute)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=10)
    return _fashion_trained(model, f"resnet18_fashion_{train_images}_{epochs}_{seed}",
                            train_images, epochs, lr=2e-3, log=log)


def resnet50_fashion(train_images: int = 12000, epochs: int = 1, seed: int = 0,
                     log: Callable[[str], None] = print) -> torch.nn.Module:
    """A torchvision ResNet-50 trained on Fashion-MNIST at 32x32 (the latency benchmark's
    convolutional model), from the cache or trained now (minutes on 2 cores)."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.resnet50(num_classes=10)
    return _fashion_trained(model, f"resnet50_fashion_{train_images}_{epochs}_{seed}",
                            train_images, epochs, lr=2e-3, log=log)


def vit_fashion(train_images: int = 12000, epochs: int = 8, seed: int = 0,
                log: Callable[[str], None] = print) -> torch.nn.Module:
    """A small timm ViT (DeiT-tiny width 192, 6 blocks of 3 heads, 4x4 patches of the 32x32
    images: 64 tokens) trained on Fashion-MNIST, from the cache or trained now (8 epochs,
    about 9 minutes on 2 cores; 2 epochs left it at 0.62 test accuracy)."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=6,
                              num_classes=10)
    return _fashion_trained(model, f"vit_fashion_{train_images}_{epochs}_{seed}",
                            train_images, epochs, lr=1e-3, log=log)


def _fashion_trained(model: torch.nn.Module, name: str, train_images: int, epochs: int, *,
                     lr: float, log: Callable[[str], None]) -> torch.nn.Module:
    """``model`` with the cached weights ``name``, or trained on Fashion-MNIST and cached."""
    from safetensors.torch import load_file

    path = CACHE / f"{name}.safetensors"
    if path.exists():
        model.load_state_dict(load_file(path))
        return model.eval()
    x, y = fashion_mnist("train")
    x, y = prepare(x[:train_images]), y[:train_images]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    model.train()
    start = time.perf_counter()
    steps = epochs * math.ceil(len(x) / 128)
    with training_bar(f"training {name} (once, then cached)", steps) as step:
        for epoch in range(epochs):
            order = torch.randperm(len(x))
            for i in range(0, len(x), 128):
                idx = order[i:i + 128]
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step()
            log(f"trained epoch {epoch + 1}/{epochs} on {len(x)} images "
                f"({time.perf_counter() - start:.0f} s, last loss {loss.item():.3f})")
    model.eval()
    _cache(model, path)
    return model


@contextlib.contextmanager
def training_bar(description: str, steps: int) -> Iterator[Callable[[], None]]:
    """A progress bar over a training loop's steps (minutes on two cores, the first time):
    ``step()`` after each optimiser step."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns) as bar:
        task = bar.add_task(description, total=steps)
        yield lambda: bar.advance(task)


def _cache(model: torch.nn.Module, path: Path) -> None:
    """Write trained weights to the cache atomically (a temporary file, then a rename)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


@dataclass
class TextTask:
    """The fine-tuned MiniLM classifier and tokenised Rotten Tomatoes splits (length 64)."""

    model: torch.nn.Module
    train: dict[str, torch.Tensor]
    test: dict[str, torch.Tensor]

    def batches(self, split: str, size: int = 32, limit: int | None = None) -> list[dict]:
        data = getattr(self, split)
        n = len(data["labels"]) if limit is None else min(limit, len(data["labels"]))
        return [{k: v[i:i + size] for k, v in data.items()} for i in range(0, n, size)]


def minilm_rotten_tomatoes(epochs: int = 2, seed: int = 0, max_length: int = 64,
                           log: Callable[[str], None] = print) -> TextTask:
    """all-MiniLM-L6-v2 with a fresh 2-way head fine-tuned on Rotten Tomatoes (the reference
    protocol: 2 epochs, AdamW lr 5e-5, batch 32, max length 64, seed 0; about 3 minutes on 2
    cores the first time, then read from the cache)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from surgery.demo.datasets import minilm_folder, rotten_tomatoes

    folder = minilm_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tr_x, tr_y, te_x, te_y = rotten_tomatoes()

    def encode(texts: list[str], labels: list[int]) -> dict[str, torch.Tensor]:
        enc = tokenizer(texts, padding="max_length", truncation=True, max_length=max_length,
                        return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "labels": torch.tensor(labels)}

    train, test = encode(tr_x, tr_y), encode(te_x, te_y)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    path = CACHE / f"minilm_rotten_tomatoes_{epochs}_{seed}_{max_length}.safetensors"
    task = TextTask(model, train, test)
    if path.exists():
        model.load_state_dict(load_file(path))
        return TextTask(model.eval(), train, test)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-5)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    steps = epochs * math.ceil(len(train["labels"]) / 32)
    with training_bar("fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes (once, then cached)",
                      steps) as step:
        for epoch in range(epochs):
            order = torch.randperm(len(train["labels"]), generator=generator)
            for i in range(0, len(order), 32):
                idx = order[i:i + 32]
                loss = model(**{k: v[idx] for k, v in train.items()}).loss
                opt.zero_grad()
                loss.backward()
                opt.step()
                step()
            log(f"fine-tuned epoch {epoch + 1}/{epochs} ({time.perf_counter() - start:.0f} s)")
    model.eval()
    _cache(model, path)
    return task


def minilm_folder_and_data(task: TextTask, log: Callable[[str], None] = print) -> Path:
    """The fine-tuned classifier as a Hugging Face folder (with its tokenizer) plus
    ``train.jsonl`` / ``test.jsonl`` of its snippets, in the cache (written once, atomically):
    what a user would hand to ``surgery prune``."""
    import json
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    from surgery.demo.datasets import minilm_folder, rotten_tomatoes

    folder = CACHE / "minilm-rotten-tomatoes"
    if (folder / "test.jsonl").exists():
        return folder
    log(f"writing the fine-tuned model and the data to {folder}")
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=CACHE, prefix=".minilm-"))
    try:
        task.model.config.id2label = {0: "rotten", 1: "fresh"}
        task.model.config.label2id = {"rotten": 0, "fresh": 1}
        task.model.save_pretrained(tmp)
        AutoTokenizer.from_pretrained(minilm_folder()).save_pretrained(tmp)
        tr_x, tr_y, te_x, te_y = rotten_tomatoes()
        for name, texts, labels in (("train", tr_x, tr_y), ("test", te_x, te_y)):
            with open(tmp / f"{name}.jsonl", "w", encoding="utf-8") as f:
                for text, label in zip(texts, labels):
                    f.write(json.dumps({"text": text, "label": int(label)}) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
