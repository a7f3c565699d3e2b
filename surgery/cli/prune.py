"""``surgery prune``: the pruned model, its plan and a report, written into one folder."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from surgery.budget.allocate import DEPTH_SCHEDULES
from surgery.budget.latency_spec import BACKENDS
from surgery.cli._common import (
    DATA_HELP,
    KIND_NOUNS,
    MODEL_HELP,
    Checkpoint,
    Device,
    InputSize,
    LabelColumn,
    Mean,
    NumClasses,
    Resize,
    SeqLen,
    Std,
    TextColumn,
    Threads,
    Tokenizer,
    app,
    check_out,
    choice,
    command_line,
    console,
    criterion_names,
    default_batch,
    describe_inputs,
    err_console,
    estimator_names,
    friendly,
    label2id_of,
    load_model_spec,
    parse_floats,
    parse_kind_weights,
    pick_device,
    stages,
    summary_table,
)
from surgery.cli.latency_cli import latency_headline, latency_settings, parse_round_to
from surgery.options import ALLOCATIONS, BUDGETS, TARGETS, PruneOptions

GENERATED = 32
"""Tokens a causal LM generates (after a prompt of --seq-len) when its speed is measured."""

BudgetKind = choice("BudgetKind", BUDGETS)
Backend = choice("Backend", BACKENDS)
CriterionName = choice("CriterionName", criterion_names())
Target = choice("Target", TARGETS)
Allocation = choice("Allocation", ALLOCATIONS)
DepthSchedule = choice("DepthSchedule", DEPTH_SCHEDULES)
EstimatorName = choice("EstimatorName", estimator_names())


@app.command()
@friendly
def prune(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help=MODEL_HELP)],
    out: Annotated[Path, typer.Option(help="Output folder (must not exist unless --overwrite).")],
    sparsity: Annotated[float, typer.Option(
        help="Share of the budget to remove, in [0, 1).")] = 0.5,
    budget: Annotated[BudgetKind, typer.Option(
        help="What --sparsity counts; 'latency': measured time on --device at --latency-batch, "
             "with --speedup or --target-ms.")] = "macs",
    target_speedup: Annotated[Optional[float], typer.Option(
        "--speedup", help="With --budget latency: how many times faster than the dense model "
                          "(e.g. 2).")
    ] = None,
    target_ms: Annotated[Optional[float], typer.Option(
        help="With --budget latency: a target time per batch of --latency-batch, in ms.")
    ] = None,
    backend: Annotated[Backend, typer.Option(
        help="Where --budget latency is timed: torch on --device, or onnxruntime (CPU; the "
             "exported model is checked against PyTorch).")] = "torch",
    criterion: Annotated[CriterionName, typer.Option(
        help="How atoms are ranked: mi is joint top-down MI (see the user guide).")] = "mi",
    target: Annotated[Target, typer.Option(
        help="What the top layer must explain: the dense model's own output, or labels.")
    ] = "output",
    allocation: Annotated[Allocation, typer.Option(
        help="One keep ratio for every group, or a global threshold on scores.")] = "uniform",
    budget_scope: Annotated[Optional[str], typer.Option(
        help="Parameter-name prefixes (comma-separated) the params budget counts, e.g. "
             "bert.encoder (default: all parameters).")] = None,
    kinds: Annotated[Optional[str], typer.Option(
        help="Only cut groups of these kinds, comma-separated (channel, head, neuron, hidden; "
             "'surgery inspect' shows each group's kind; default: every kind).")] = None,
    exclude: Annotated[Optional[list[str]], typer.Option(
        help="Module-name pattern whose weights stay as they are (fnmatch, e.g. 'layer4.*' "
             "or '*.attention.*'); repeat for several.")] = None,
    kind_weights: Annotated[Optional[str], typer.Option(
        help="Per-kind cut rates, e.g. neuron=1,head=0.5,hidden=0.25; 'uniform' (every kind "
             "alike); or 'search' to choose them on the calibration data (default: the "
             "plugin's, e.g. neuron=1,head=0.5,hidden=0.1 for transformers).")] = None,
    depth_schedule: Annotated[DepthSchedule, typer.Option(
        help="flat: every layer at the shared rate; log: the rate rises with depth as "
             "ln(i+1), the first layer of each kind whole (SlimGPT's schedule; for deep "
             "models such as LLMs).")] = "flat",
    estimator: Annotated[EstimatorName, typer.Option(
        help="MI estimator of mi/mi_topk.")] = "gaussian",
    target_noise: Annotated[float, typer.Option(
        help="Gaussian MI sees each target through noise of this many times its mean "
             "variance (a positive number): 10 weighs a target direction by its variance, "
             "near 0 every direction alike.")] = 10.0,
    round_to: Annotated[str, typer.Option(
        help="Kept channels per group are multiples of this (e.g. 16), or 'auto': the "
             "multiple the device was measured to prefer.")] = "1",
    min_keep: Annotated[int, typer.Option(min=1, help="Fewest atoms a group keeps.")] = 1,
    data: Annotated[Optional[str], typer.Option(help="Calibration data: " + DATA_HELP)] = None,
    eval_data: Annotated[Optional[str], typer.Option(
        help="Accuracy data (default: --data's test split, or --data itself).")] = None,
    calib_samples: Annotated[int, typer.Option(min=1, help="Calibration samples.")] = 512,
    eval_samples: Annotated[int, typer.Option(
        min=0, help="Samples for accuracy (0: skip accuracy).")] = 2000,
    batch_size: Annotated[Optional[int], typer.Option(
        min=1, help="Batch size for calibration and accuracy (default 64; 8 for causal "
                    "language models, whose 49k-way outputs per token are large).")] = None,
    latency_batch: Annotated[int, typer.Option(
        min=0, help="Batch size of the latency measurement and of --budget latency (0: skip "
                    "latency).")] = 32,
    recalibrate: Annotated[bool, typer.Option(
        help="Re-estimate BatchNorm statistics after the cut.")] = True,
    compensate: Annotated[bool, typer.Option(
        help="Refit the layers reading a cut group by least squares on the calibration "
             "statistics.")] = True,
    sequential: Annotated[bool, typer.Option(
        "--sequential",
        help="Refit bottom-up, each layer on the activations of the model as cut below it "
             "(about one more calibration pass; best for deep models such as LLMs).")] = False,
    uniform_widths: Annotated[bool, typer.Option(
        "--uniform-widths",
        help="Keep one width per kind in every layer and cut only what the model's config can "
             "express, so a Hugging Face model becomes a plain folder that from_pretrained "
             "loads without surgery (BERT: FFN neurons only; ViT: heads and hidden dims "
             "too).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite",
                                            help="Replace an existing --out.")] = False,
    checkpoint: Checkpoint = None,
    input_size: InputSize = None,
    num_classes: NumClasses = None,
    seq_len: SeqLen = 128,
    tokenizer: Tokenizer = None,
    resize: Resize = None,
    mean: Mean = None,
    std: Std = None,
    text_column: TextColumn = None,
    label_column: LabelColumn = "label",
    device: Device = "auto",
    threads: Threads = 0,
    seed: Annotated[int, typer.Option(
        help="Seed for initialisation (no checkpoint) and 'random'.")] = 0,
) -> None:
    """Prune MODEL and write the pruned model, its plan and a report into --out."""
    import torch

    from surgery.scoring.criteria import get_criterion

    command = command_line(ctx)
    check_out(Path(out).absolute(), overwrite)
    budget, criterion, target, allocation, estimator, depth_schedule = (  # plain strings
        str(v) for v in (budget, criterion, target, allocation, estimator, depth_schedule))
    dev = pick_device(device, threads)
    options = PruneOptions(
        **latency_settings(budget, target_speedup, target_ms, backend, latency_batch, dev,
                           threads),
        sparsity=sparsity, budget=budget, criterion=criterion, target=target,
        allocation=allocation, budget_scope=tuple(budget_scope.split(",")) if budget_scope else (),
        kinds=frozenset(k.strip() for k in kinds.split(",")) if kinds else None,
        exclude=tuple(exclude or ()),
        kind_weights=parse_kind_weights(kind_weights), depth_schedule=depth_schedule,
        estimator=estimator,
        target_noise=target_noise, round_to=parse_round_to(round_to),
        min_keep=min_keep, seed=seed, recalibrate=recalibrate, compensate=compensate,
        sequential=sequential, uniform_widths=uniform_widths)
    if data is None and get_criterion(criterion).needs_calibration:
        raise ValueError(f"criterion {criterion!r} needs calibration data: pass --data "
                         f"({DATA_HELP}), or use --criterion magnitude.")
    torch.manual_seed(seed)
    loaded = load_model_spec(model, checkpoint=checkpoint, input_size=input_size,
                             num_classes=num_classes, seq_len=seq_len, tokenizer=tokenizer,
                             seed=seed)
    loaded.model.to(dev)
    data_opts = dict(tokenizer=loaded.tokenizer, resize=resize, mean=parse_floats(mean, "--mean"),
                     std=parse_floats(std, "--std"), text_column=text_column,
                     label_column=label_column, label2id=label2id_of(loaded.model),
                     batch_size=batch_size or default_batch(loaded.inputs))
    calib, evaluation = _data(data, eval_data, loaded, options, calib_samples, eval_samples,
                              data_opts)
    dense, after, speedup, pruned, plan, seconds = _prune_and_measure(
        loaded, dev, options, calib, evaluation, latency_batch)
    settings = {
        "model": model, "checkpoint": str(checkpoint) if checkpoint else "none (seeded init)"
        if loaded.recipe["source"] in ("timm", "torchvision") else "the model's own",
        "inputs": describe_inputs(loaded.inputs), "sparsity": sparsity, "budget": budget,
        **({"speedup": target_speedup, "target ms": target_ms, "latency backend": backend}
           if budget == "latency" else {}),
        "criterion": criterion, "target": target, "allocation": allocation,
        "budget scope": budget_scope or "all parameters",
        "kinds": kinds or "every kind", "excluded": list(exclude or []) or "nothing",
        "kind weights": plan.budget.get("kind_weights") or "all kinds alike",
        "depth schedule": depth_schedule,
        "estimator": estimator, "target noise": target_noise,
        "round_to": plan.budget.get("round_to", round_to),
        "min_keep": min_keep,
        "calibration data": data or "none", "calibration samples": calib.samples if calib else 0,
        "evaluation data": (eval_data or data) if evaluation else "none",
        "batchnorm re-estimation": recalibrate, "least-squares compensation":
        ("sequential" if sequential else "on dense statistics") if compensate else False,
        "uniform widths": uniform_widths, "device": dev, "seed": seed,
    }
    loads = _write(out, overwrite, loaded, pruned, plan, model, command, dense, after, speedup,
                   settings, seconds)
    _summarise(model, options, plan, dense, after, speedup, seconds, out)
    console.print(loads)


def _data(data: str | None, eval_data: str | None, loaded: Any, options: PruneOptions,
          calib_samples: int, eval_samples: int, data_opts: dict[str, Any]) -> tuple[Any, Any]:
    """The calibration and evaluation batches the specs name (either may be None)."""
    from surgery.cli.data import load_data

    calib = evaluation = None
    if data is not None:
        calib = load_data(data, loaded.inputs, split="train", limit=calib_samples, **data_opts)
        if options.target == "labels" and not calib.has_labels():
            raise ValueError(f"--target labels, but the batches of {data!r} carry no labels.")
    if eval_samples > 0 and (eval_data or data):
        evaluation = load_data(eval_data or data, loaded.inputs, split="test", limit=eval_samples,
                               **data_opts)
    return calib, evaluation


def _prune_and_measure(loaded: Any, dev: str, options: PruneOptions, calib: Any,
                       evaluation: Any, latency_batch: int) -> tuple:
    """Prune, then measure both models: accuracy each, latency side by side (interleaved
    rounds, so a busy machine slows both alike), with progress bars."""
    import torch

    import surgery
    from surgery._core.batches import to_device
    from surgery.counting import add_generation, add_latency, measure

    net = loaded.model
    example = to_device(loaded.example_inputs(1), torch.device(dev))
    totals = {"calibrate": calib.total if calib else None,
              "measure dense": evaluation.total if evaluation else None,
              "measure pruned": evaluation.total if evaluation else None}
    with stages(totals) as bars:
        start = time.perf_counter()
        pruned, plan = surgery.prune(net, example, calib, options=options, progress=bars)
        seconds = time.perf_counter() - start
        dense = measure(net, example, batches=evaluation,
                        progress=bars.callback("measure dense") if evaluation else None)
        after = measure(pruned, example, batches=evaluation,
                        progress=bars.callback("measure pruned") if evaluation else None)
    speedup = None
    if latency_batch > 0:
        with console.status(f"timing dense and pruned side by side at batch {latency_batch}..."):
            timing = to_device(loaded.example_inputs(latency_batch), torch.device(dev))
            speedup = add_latency({"dense": dense, "pruned": after},
                                  {"dense": net, "pruned": pruned}, timing, latency_batch)
        if loaded.inputs["kind"] == "causal":
            with console.status(f"timing generation of {GENERATED} tokens, dense and pruned "
                                "side by side..."):
                add_generation({"dense": dense, "pruned": after},
                               {"dense": net, "pruned": pruned},
                               to_device(loaded.example_inputs(1)["input_ids"],
                                         torch.device(dev)), GENERATED)
    return dense, after, speedup, pruned, plan, seconds


def _write(out: Path, overwrite: bool, loaded: Any, pruned: Any, plan: Any, model: str,
           command: str, dense: Any, after: Any, speedup: Any, settings: dict[str, Any],
           seconds: float) -> str:
    """The pruned model, its plan and the report, into ``out`` at once (or not at all);
    returns what loads the folder (:func:`surgery.cli.folders.how_it_loads`)."""
    from surgery.cli.folders import how_it_loads, save_pruned
    from surgery.cli.report import write_report
    from surgery.io._atomic import atomic_folder

    with console.status(f"writing the pruned model, plan and report to {out}..."):
        with atomic_folder(out, overwrite=overwrite) as tmp:
            save_pruned(tmp, loaded, pruned, plan)
            loads = how_it_loads(tmp, pruned)
            write_report(tmp, plan=plan, model=model, command=command, dense=dense,
                         pruned=after, speedup=speedup, settings=settings, seconds=seconds,
                         loads=loads)
    return loads


def _summarise(model: str, options: PruneOptions, plan: Any, dense: Any, after: Any,
               speedup: Any, seconds: float, out: Path) -> None:
    from surgery.cli.report import summary_rows

    scope = f" in {','.join(options.budget_scope)}" if options.budget_scope else ""
    what = (latency_headline(plan) if options.budget == "latency"
            else f"{options.sparsity:.0%} of {options.budget}{scope} removed")
    console.print(summary_table(f"{model}: {what} by {options.criterion} in {seconds:.1f} s",
                                summary_rows(dense, after, speedup)))
    kinds: dict[str, list[int]] = {}
    for g in plan.groups:
        k = kinds.setdefault(g.kind, [0, 0])
        k[0], k[1] = k[0] + g.atoms, k[1] + len(g.kept)
    console.print("kept: " + ", ".join(f"{b}/{a} {KIND_NOUNS.get(kind, kind + 's')}"
                                       for kind, (a, b) in kinds.items()))
    for name, why in (plan.extra.get("fallbacks") or {}).items():
        err_console.print(f"[yellow]note:[/] group {name} could not be scored as asked ({why}).")
    console.print(f"pruned model, plan and report written to {out}/ (report.md, report.html)")
