"""``surgery export``: the pruned model as ONNX, checked in onnxruntime against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from surgery.cli._common import PrunedFolderArg, app, console, friendly


@app.command()
@friendly
def export(
    folder: PrunedFolderArg,
    onnx: Annotated[Path, typer.Option(help="Where to write the ONNX file.")],
    atol: Annotated[float, typer.Option(min=0.0,
                                        help="Max abs difference allowed vs PyTorch.")] = 1e-4,
    opset: Annotated[Optional[int], typer.Option(
        min=7, help="ONNX opset (default: the exporter's).")] = None,
    batch_size: Annotated[int, typer.Option(
        min=1, help="Batch of the example used for tracing.")] = 2,
    dynamic_batch: Annotated[bool, typer.Option(
        "--dynamic-batch/--static-batch", help="Export the batch dimension as dynamic.")] = True,
) -> None:
    """Export the pruned model to ONNX and check it in onnxruntime against PyTorch."""
    from surgery.cli.folders import load_pruned
    from surgery.io.onnx import export_onnx

    with console.status(f"rebuilding the pruned model from {folder}..."):
        pruned = load_pruned(folder)
    with console.status(f"exporting to {onnx} and checking it in onnxruntime..."):
        result = export_onnx(pruned.model, pruned.example_inputs(max(1, batch_size)), onnx,
                             check_inputs=pruned.example_inputs(max(1, batch_size) + 3),
                             atol=atol, opset=opset, dynamic_batch=dynamic_batch)
    console.print(f"wrote {result.path} ({result.exporter} exporter, "
                  f"{'dynamic' if result.dynamic_batch else 'static'} batch); onnxruntime matches "
                  f"PyTorch: max abs diff {result.max_abs_diff:.2e} <= {atol:g} over "
                  f"{result.outputs} output(s)")
