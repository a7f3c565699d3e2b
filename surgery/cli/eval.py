"""``surgery eval``: accuracy (or perplexity), latency, params and MACs of a pruned folder,
dense vs pruned."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from surgery.cli._common import (
    DATA_HELP,
    Device,
    JsonOut,
    LabelColumn,
    Mean,
    PrunedFolderArg,
    Resize,
    Std,
    TextColumn,
    Threads,
    app,
    console,
    default_batch,
    err_console,
    friendly,
    label2id_of,
    open_folder,
    parse_floats,
    pick_device,
    stages,
    summary_table,
    write_json,
)


@app.command("eval")
@friendly
def eval_(
    folder: PrunedFolderArg,
    data: Annotated[str, typer.Option(help=DATA_HELP)],
    eval_samples: Annotated[int, typer.Option(
        "--eval-samples", "--samples", min=1, help="Samples to evaluate.")] = 2000,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Batch size (default 64; 8 for causal language models).")] = None,
    latency_batch: Annotated[int, typer.Option(
        min=0, help="Batch size for latency (0: skip).")] = 32,
    resize: Resize = None,
    mean: Mean = None,
    std: Std = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = "label",
    device: Device = "auto",
    threads: Threads = 0,
    json_out: JsonOut = None,
) -> None:
    """Accuracy (perplexity for a causal language model), latency, params and MACs of a pruned
    model, dense vs pruned."""
    import torch

    from surgery._core.batches import to_device
    from surgery.cli.data import load_data
    from surgery.cli.report import summary_rows
    from surgery.counting import Measurement, add_latency, measure

    dev = pick_device(device, threads)
    pruned, dense = open_folder(folder, dev)
    batches = load_data(data, pruned.inputs, split="test",
                        batch_size=batch_size or default_batch(pruned.inputs),
                        limit=eval_samples,
                        tokenizer=pruned.tokenizer(), resize=resize,
                        mean=parse_floats(mean, "--mean"),
                        std=parse_floats(std, "--std"), text_column=text_column,
                        label_column=label_column, label2id=label2id_of(pruned.model))
    example = to_device(pruned.example_inputs(1), torch.device(dev))
    models = {"dense": dense, "pruned": pruned.model} if dense is not None else \
        {"pruned": pruned.model}
    results: dict[str, Measurement] = {}
    with stages({f"evaluate {name}": batches.total for name in models}) as bars:
        for name, net in models.items():
            results[name] = measure(net, example, batches=batches,
                                    progress=bars.callback(f"evaluate {name}"))
    speedup = None
    if latency_batch > 0:
        with console.status(f"timing {' and '.join(models)} at batch {latency_batch}..."):
            timing = to_device(pruned.example_inputs(latency_batch), torch.device(dev))
            speedup = add_latency(results, models, timing, latency_batch)
    after = results["pruned"]
    before = results.get("dense", Measurement(0, 0))
    if after.accuracy is None and after.perplexity is None:
        err_console.print(f"[yellow]warning:[/] {data!r} has no labels or the model outputs no "
                          "class scores: no accuracy.")
    console.print(summary_table(f"{folder} on {data}", summary_rows(before, after, speedup)))
    write_json(json_out, {**{k: vars(v) for k, v in results.items()},
                          "speedup": vars(speedup) if speedup is not None else None})
