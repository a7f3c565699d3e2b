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

from surgery.errors import SurgeryError

FASHION_MNIST_DIRS = (
    os.environ.get("SURGERY_FASHION_MNIST", ""),
    "/usr/share/datasets/fashion-mnist",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)


class AssetMissing(SurgeryError):
    """A real model or data set is not installed; the message says how to install it."""


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
