"""Pruned-model folders as ``surgery prune`` writes them: :mod:`surgery.io`'s files plus
``source.json`` (where the dense model came from and how its inputs look). The one place that
knows the folder's layout."""

from __future__ import annotations

import json
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from surgery.cli.specs import Loaded, build_model, import_callable, load_tokenizer, make_example
from surgery.errors import LoadError

SOURCE_FILE = "source.json"
"""Beside :mod:`surgery.io`'s files: where the dense model came from (checkpoint, seed) and how
its inputs look and are preprocessed, so ``eval``/``bench``/``export`` feed it like ``prune``."""


def factory_model(factory: str, **kwargs: Any) -> torch.nn.Module:
    """Call the ``module:callable`` ``factory`` and return the model alone (factories may return
    ``(model, example_inputs)``): the architecture :mod:`surgery.io` rebuilds factories with."""
    result = import_callable(factory, "MODEL")(**kwargs)
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
    return Architecture.factory("surgery.cli.folders:factory_model", factory=recipe["name"],
                                **kwargs)


def save_pruned(folder: str | os.PathLike, loaded: Loaded, pruned: torch.nn.Module,
                plan: Any) -> None:
    """Write a pruned model into the (temporary, see ``surgery.io._atomic``) ``folder``:
    :func:`surgery.io.save`'s files plus ``source.json``. ``loaded.model`` must still be the
    unpruned model.

    This and :func:`load_pruned` are the only code that knows the folder's layout."""
    from surgery.io.folder import check_architecture, write_folder

    if any(p.is_cuda for p in pruned.parameters()):
        pruned = pruned.cpu()
    arch = architecture(loaded)
    with warnings.catch_warnings():  # the base is built on the meta device: a factory that
        warnings.simplefilter("ignore", UserWarning)  # loads weights warns of no-op copies
        check_architecture(arch, plan)
    write_folder(pruned, Path(folder), plan, arch, tokenizer=loaded.tokenizer)
    (Path(folder) / SOURCE_FILE).write_text(json.dumps(
        {"recipe": loaded.recipe, "inputs": loaded.inputs}, indent=1))


def how_it_loads(folder: str | os.PathLike, pruned: torch.nn.Module) -> str:
    """One sentence for the prune output and report: what loads the pruned model written in
    ``folder``. Always :func:`surgery.io.load`; for a Hugging Face model also
    ``from_pretrained`` when the folder is a plain one (``config.json`` is written only when
    the updated config rebuilds the pruned model), else why it is not."""
    config = getattr(pruned, "config", None)
    if not type(pruned).__module__.startswith("transformers.") or config is None:
        return "this folder loads with surgery.io.load"
    if (Path(folder) / "config.json").is_file():
        return ("this folder loads with surgery.io.load, and also loads with transformers' "
                "AutoModel*.from_pretrained (a plain Hugging Face folder: config.json + "
                "model.safetensors)")
    sizes = getattr(config, "surgery_layer_sizes", None) or {}
    differ = any(isinstance(v, list) and len(set(v)) > 1 for v in sizes.values())
    why = ("widths differ across layers" if differ
           else f"a plain {type(config).__name__} cannot describe these widths")
    return (f"this folder loads with surgery.io.load ({why}: not a plain Hugging Face folder; "
            "prune with --uniform-widths for one)")


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
