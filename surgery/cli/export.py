"""``surgery export``: the pruned model as ONNX, checked in onnxruntime against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from surgery.cli._common import app, console, friendly


@app.command()
@friendly
def export(
    folder: Path = typer.Argument(..., help="A folder written by 'surgery prune'."),
    onnx: Path = typer.Option(..., "--onnx", help="Where to write the ONNX file."),
    atol: float = typer.Option(1e-4, help="Max abs difference allowed vs PyTorch."),
    opset: Optional[int] = typer.Option(None, help="ONNX opset (default: the exporter's)."),
    batch_size: int = typer.Option(2, help="Batch of the example used for tracing."),
    dynamic_batch: bool = typer.Option(True, "--dynamic-batch/--static-batch",
                                       help="Export the batch dimension as dynamic."),
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
