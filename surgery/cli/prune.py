"""``surgery prune``: the pruned model, its plan and a report, written into one folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import typer

from surgery.cli._common import (
    CHECKPOINT,
    DATA_HELP,
    DEVICE,
    INPUT_SIZE,
    KIND_NOUNS,
    LABEL_COLUMN,
    MEAN,
    MODEL_HELP,
    NUM_CLASSES,
    RESIZE,
    SEQ_LEN,
    STD,
    TEXT_COLUMN,
    THREADS,
    TOKENIZER,
    _check_out,
    _describe_inputs,
    _device,
    _floats,
    _kind_weights,
    _label2id,
    _load,
    _summary_table,
    app,
    command_line,
    console,
    friendly,
    stages,
)


@app.command()
@friendly
def prune(
    ctx: typer.Context,
    model: str = typer.Argument(..., help=MODEL_HELP),
    out: Path = typer.Option(..., "--out",
                             help="Output folder (must not exist unless --overwrite)."),
    sparsity: float = typer.Option(0.5, help="Share of the budget to remove, in (0, 1)."),
    budget: str = typer.Option("macs", help="What sparsity counts: params or macs."),
    criterion: str = typer.Option("mi", help="mi (joint MI), mi_topk, act_weight, taylor, "
                                             "magnitude, random, or a "
                                             "plugin's."),
    target: str = typer.Option("output", help="output (the dense model's own output) or labels."),
    allocation: str = typer.Option("uniform", help="uniform keep ratio, or global by score."),
    budget_scope: Optional[str] = typer.Option(
        None, help="Parameter-name prefixes (comma-separated) the params budget counts, e.g. "
                   "bert.encoder (default: all parameters)."),
    kind_weights: Optional[str] = typer.Option(
        None, help="Per-kind cut rates, e.g. neuron=1,head=0.5,hidden=0.25, or 'search' to "
                   "choose them on the calibration data (default: all kinds alike)."),
    estimator: str = typer.Option("gaussian", help="MI estimator (gaussian or a plugin's)."),
    round_to: int = typer.Option(1, help="Kept channels per group are multiples of this (e.g. 16)."),
    min_keep: int = typer.Option(1, help="Fewest atoms a group keeps."),
    data: Optional[str] = typer.Option(None, help="Calibration data: " + DATA_HELP),
    eval_data: Optional[str] = typer.Option(
        None, help="Accuracy data (default: --data's test split, or --data itself)."),
    calib_samples: int = typer.Option(512, help="Calibration samples."),
    eval_samples: int = typer.Option(2000, help="Samples for accuracy (0: skip accuracy)."),
    batch_size: int = typer.Option(64, help="Batch size for calibration and accuracy."),
    latency_batch: int = typer.Option(32, help="Batch size of the latency measurement "
                                               "(0: skip latency)."),
    recalibrate: bool = typer.Option(True, "--recalibrate/--no-recalibrate",
                                     help="Re-estimate BatchNorm statistics after the cut."),
    compensate: bool = typer.Option(True, "--compensate/--no-compensate",
                                    help="Refit the layers reading a cut group by least squares "
                                         "on the calibration statistics."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out."),
    checkpoint: Optional[Path] = CHECKPOINT,
    input_size: Optional[str] = INPUT_SIZE,
    num_classes: Optional[int] = NUM_CLASSES,
    seq_len: int = SEQ_LEN,
    tokenizer: Optional[str] = TOKENIZER,
    resize: Optional[int] = RESIZE,
    mean: Optional[str] = MEAN,
    std: Optional[str] = STD,
    text_column: Optional[str] = TEXT_COLUMN,
    label_column: str = LABEL_COLUMN,
    device: str = DEVICE,
    threads: int = THREADS,
    seed: int = typer.Option(0, help="Seed for initialisation (no checkpoint) and 'random'."),
) -> None:
    """Prune MODEL and write the pruned model, its plan and a report into --out."""
    import torch

    import surgery
    from surgery._core.batches import to_device
    from surgery.cli.data import load_data
    from surgery.cli.folders import save_pruned
    from surgery.cli.report import write_report
    from surgery.counting import measure
    from surgery.io._atomic import atomic_folder

    command = command_line(ctx)
    _check_out(Path(out).absolute(), overwrite)
    from surgery.scoring.criteria import get_criterion

    if data is None and get_criterion(criterion).needs_calibration:
        raise ValueError(f"criterion {criterion!r} needs calibration data: pass --data "
                         f"({DATA_HELP}), or use --criterion magnitude.")
    dev = _device(device, threads)
    torch.manual_seed(seed)
    loaded = _load(model, checkpoint=checkpoint, input_size=input_size, num_classes=num_classes,
                   seq_len=seq_len, tokenizer=tokenizer, seed=seed)
    net = loaded.model.to(dev)
    example = to_device(loaded.example_inputs(1), torch.device(dev))
    data_opts = dict(tokenizer=loaded.tokenizer, resize=resize, mean=_floats(mean, "--mean"),
                     std=_floats(std, "--std"), text_column=text_column,
                     label_column=label_column, label2id=_label2id(net), batch_size=batch_size)
    calib = evaluation = None
    if data is not None:
        calib = load_data(data, loaded.inputs, split="train", limit=calib_samples, **data_opts)
        if target == "labels" and not calib.has_labels():
            raise ValueError(f"--target labels, but the batches of {data!r} carry no labels.")
    if eval_samples > 0 and (eval_data or data):
        evaluation = load_data(eval_data or data, loaded.inputs, split="test", limit=eval_samples,
                               **data_opts)
    timing = (to_device(loaded.example_inputs(latency_batch), torch.device(dev))
              if latency_batch > 0 else None)

    with stages({"measure dense": evaluation.total if evaluation else None,
                 "calibrate": calib.total if calib else None,
                 "measure pruned": evaluation.total if evaluation else None}) as bars:
        dense = measure(net, example, batches=evaluation, latency_inputs=timing,
                        latency_batch=latency_batch or None,
                        progress=bars.callback("measure dense") if evaluation else None)
        start = time.perf_counter()
        pruned, plan = surgery.prune(
            net, example, calib, sparsity, budget=budget, criterion=criterion, target=target,
            budget_scope=tuple(budget_scope.split(",")) if budget_scope else (),
            allocation=allocation, kind_weights=_kind_weights(kind_weights), estimator=estimator,
            round_to=round_to, min_keep=min_keep, seed=seed, recalibrate=recalibrate,
            compensate=compensate, progress=bars)
        seconds = time.perf_counter() - start
        after = measure(pruned, example, batches=evaluation, latency_inputs=timing,
                        latency_batch=latency_batch or None,
                        progress=bars.callback("measure pruned") if evaluation else None)

    settings = {
        "model": model, "checkpoint": str(checkpoint) if checkpoint else "none (seeded init)"
        if loaded.recipe["source"] in ("timm", "torchvision") else "the model's own",
        "inputs": _describe_inputs(loaded.inputs), "sparsity": sparsity, "budget": budget,
        "criterion": criterion, "target": target, "allocation": allocation,
        "budget scope": budget_scope or "all parameters",
        "kind weights": plan.budget.get("kind_weights") or "all kinds alike",
        "estimator": estimator, "round_to": round_to, "min_keep": min_keep,
        "calibration data": data or "none", "calibration samples": calib.samples if calib else 0,
        "evaluation data": (eval_data or data) if evaluation else "none",
        "batchnorm re-estimation": recalibrate, "least-squares compensation": compensate,
        "device": dev, "seed": seed,
    }
    with console.status(f"writing the pruned model, plan and report to {out}..."):
        with atomic_folder(out, overwrite=overwrite) as tmp:
            save_pruned(tmp, loaded, pruned, plan)
            write_report(tmp, plan=plan, model=model, command=command, dense=dense,
                         pruned=after, settings=settings, seconds=seconds)

    from surgery.cli.report import summary_rows

    console.print(_summary_table(
        f"{model}: {sparsity:.0%} of {budget}{f' in {budget_scope}' if budget_scope else ''} "
        f"removed by {criterion} in {seconds:.1f} s",
        summary_rows(dense, after)))
    kinds: dict[str, list[int]] = {}
    for g in plan.groups:
        k = kinds.setdefault(g.kind, [0, 0])
        k[0], k[1] = k[0] + g.atoms, k[1] + len(g.kept)
    console.print("kept: " + ", ".join(f"{b}/{a} {KIND_NOUNS.get(kind, kind + 's')}"
                                       for kind, (a, b) in kinds.items()))
    console.print(f"pruned model, plan and report written to {out}/ (report.md, report.html)")
