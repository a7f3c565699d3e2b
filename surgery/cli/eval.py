"""``surgery eval``: accuracy, latency, params and MACs of a pruned folder, dense vs pruned."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from surgery.cli._common import (
    DATA_HELP,
    DEVICE,
    LABEL_COLUMN,
    MEAN,
    RESIZE,
    STD,
    TEXT_COLUMN,
    THREADS,
    _device,
    _floats,
    _label2id,
    _open_folder,
    _summary_table,
    _write_json,
    app,
    console,
    err_console,
    friendly,
    stages,
)


@app.command("eval")
@friendly
def eval_(
    folder: Path = typer.Argument(..., help="A folder written by 'surgery prune'."),
    data: str = typer.Option(..., help=DATA_HELP),
    samples: int = typer.Option(2000, help="Samples to evaluate."),
    batch_size: int = typer.Option(64, help="Batch size."),
    latency_batch: int = typer.Option(32, help="Batch size for latency (0: skip)."),
    resize: Optional[int] = RESIZE,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    threads: int = THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON."),
) -> None:
    """Accuracy, latency, params and MACs of a pruned model, dense vs pruned."""
    import torch

    from surgery._core.batches import to_device
    from surgery.cli.data import load_data
    from surgery.cli.report import summary_rows
    from surgery.counting import Measurement, measure

    dev = _device(device, threads)
    pruned, dense = _open_folder(folder, dev)
    batches = load_data(data, pruned.inputs, split="test", batch_size=batch_size, limit=samples,
                        tokenizer=pruned.tokenizer(), resize=resize, mean=_floats(mean, "--mean"),
                        std=_floats(std, "--std"), text_column=text_column,
                        label_column=label_column, label2id=_label2id(pruned.model))
    example = to_device(pruned.example_inputs(1), torch.device(dev))
    timing = (to_device(pruned.example_inputs(latency_batch), torch.device(dev))
              if latency_batch > 0 else None)
    results: dict[str, Measurement] = {}
    with stages({"evaluate dense": batches.total, "evaluate pruned": batches.total}) as bars:
        for name, net in (("dense", dense), ("pruned", pruned.model)):
            if net is not None:
                results[name] = measure(net, example, batches=batches, latency_inputs=timing,
                                        latency_batch=latency_batch or None,
                                        progress=bars.callback(f"evaluate {name}"))
    after = results["pruned"]
    before = results.get("dense", Measurement(0, 0))
    if after.accuracy is None:
        err_console.print(f"[yellow]warning:[/] {data!r} has no labels or the model outputs no "
                          "class scores: no accuracy.")
    console.print(_summary_table(f"{folder} on {data}", summary_rows(before, after)))
    _write_json(json_out, {k: vars(v) for k, v in results.items()})
