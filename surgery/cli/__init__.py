"""The ``surgery`` command line (Typer + Rich), one module per command.

``surgery demo`` (the README's main job), ``inspect`` (coupled groups, params, MACs, a drawing
of the group structure), ``prune`` (writes the pruned model, its plan and a report into a
folder, atomically), ``eval`` and ``bench`` (dense vs pruned), ``export`` (ONNX, checked in
onnxruntime), ``plan show`` (what a plan cut, per kind and per layer). MODEL specs are
resolved by :mod:`surgery.cli.specs`, DATA specs by :mod:`surgery.cli.data`, pruned-model
folders by :mod:`surgery.cli.folders`.
"""

from surgery.cli import bench, demo, eval, export, inspect, plan, prune  # noqa: F401
from surgery.cli._common import app


def main() -> None:
    app()


__all__ = ["app", "main"]
