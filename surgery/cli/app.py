"""The ``surgery`` command line (Typer + Rich).

``surgery demo`` (the README's main job), ``inspect`` (coupled groups, params, MACs, a drawing
of the group structure), ``prune`` (writes the pruned model, its plan and a report into a
folder, atomically), ``eval`` and ``bench`` (dense vs pruned), ``export`` (ONNX, checked in
onnxruntime). MODEL and DATA specs are resolved by :mod:`surgery.loading`.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn)
from rich.table import Table

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prune PyTorch models by mutual information, for real.")
console = Console()
err_console = Console(stderr=True)


@app.command()
def demo(
    task: str = typer.Argument("minilm", help="minilm (the default: all-MiniLM-L6-v2 on Rotten "
                                              "Tomatoes) or resnet18 (on Fashion-MNIST)."),
    sparsity: float = typer.Option(0.5, help="Share of the encoder's parameters (minilm) or "
                                             "of MACs (resnet18) to remove."),
    criterion: str = typer.Option("mi", help="mi, mi_topk, act_weight, magnitude or random."),
    out: Path = typer.Option(Path("surgery-demo"), help="Output folder (replaced)."),
) -> None:
    """Prune a real trained model on real data and print before/after.

    minilm: fine-tunes all-MiniLM-L6-v2 on Rotten Tomatoes once (cached), then runs
    'surgery prune' on it and leaves the pruned model, plan and report in --out."""
    if task == "resnet18":
        return _demo_resnet18(sparsity, criterion, out)
    if task != "minilm":
        raise typer.BadParameter(f"task must be minilm or resnet18, got {task!r}.")
    from surgery import demo as job

    with console.status("loading or fine-tuning all-MiniLM-L6-v2 on Rotten Tomatoes (about 3 "
                        "minutes the first time)..."):
        folder = job.minilm_folder_and_data(job.minilm_rotten_tomatoes(log=console.print),
                                            log=console.print)
    args = ["prune", str(folder), "--out", str(out), "--overwrite", "--sparsity", str(sparsity),
            "--budget", "params", "--budget-scope", "bert.encoder", "--criterion", criterion,
            "--data", str(folder / "train.jsonl"), "--eval-data", str(folder / "test.jsonl"),
            "--calib-samples", "512", "--eval-samples", "2000", "--batch-size", "32",
            "--seq-len", "64", "--round-to", "16"]
    console.print("[bold]" + " ".join(["surgery", *args]))
    typer.main.get_command(app).main(args=args, prog_name="surgery", standalone_mode=False)


def _demo_resnet18(sparsity: float, criterion: str, out: Path) -> None:
    """ResNet-18 trained on Fashion-MNIST, pruned by ``criterion`` and the baselines."""
    import torch

    import surgery
    from surgery import demo as job
    from surgery.demo.datasets import fashion_mnist

    calib_images, test_images = 512, 2000
    torch.manual_seed(0)
    with console.status("loading or training ResNet-18 on Fashion-MNIST..."):
        model = job.resnet18_fashion(log=console.print)
    train_x, train_y = fashion_mnist("train")
    test_x, test_y = fashion_mnist("test")
    calib_x = job.prepare(train_x[-calib_images:])
    calib_y = train_y[-calib_images:]
    test_x, test_y = job.prepare(test_x[:test_images]), test_y[:test_images]
    calib = [(calib_x[i:i + 64], calib_y[i:i + 64]) for i in range(0, len(calib_x), 64)]

    with console.status("measuring the dense model..."):
        dense = job.measure(model, test_x, test_y, batch=32)
    results = {}
    for crit in dict.fromkeys([criterion, "mi_topk", "act_weight", "magnitude", "random"]):
        start = time.perf_counter()
        with console.status(f"pruning {sparsity:.0%} of MACs by {crit}..."):
            pruned, plan = surgery.prune(model, test_x[:2], calib, sparsity=sparsity,
                                         criterion=crit, target="output")
        seconds = time.perf_counter() - start
        with console.status(f"measuring the model pruned by {crit}..."):
            results[crit] = (job.measure(pruned, test_x, test_y, batch=32), seconds, plan)
    after, seconds, plan = results[criterion]

    groups = Table(title=f"coupled channel groups cut by {criterion} ({len(plan.groups)} prunable)")
    for col in ("group", "kind", "atoms", "kept"):
        groups.add_column(col, justify="right" if col in ("atoms", "kept") else "left")
    for g in plan.groups:
        groups.add_row(g.name, g.kind, str(g.atoms), str(len(g.kept)))
    console.print(groups)

    table = Table(title=f"ResNet-18 / Fashion-MNIST, {sparsity:.0%} of MACs removed by {criterion} "
                        f"(pruned in {seconds:.1f} s; BatchNorm statistics re-estimated, "
                        "no retraining)")
    for col in ("", "dense", "pruned", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("test accuracy", f"{dense.accuracy:.3f}", f"{after.accuracy:.3f}",
                  f"{after.accuracy - dense.accuracy:+.3f}")
    table.add_row("parameters", f"{dense.params:,}", f"{after.params:,}",
                  f"{after.params / dense.params:.2f}x")
    table.add_row("MACs / image", f"{dense.macs:,}", f"{after.macs:,}",
                  f"{after.macs / dense.macs:.2f}x")
    table.add_row("latency, batch 32 (ms)", f"{dense.latency_ms:.1f}", f"{after.latency_ms:.1f}",
                  f"{dense.latency_ms / after.latency_ms:.2f}x faster")
    console.print(table)
    others = Table(title="same budget, other criteria (test accuracy)")
    for col in ("criterion", "accuracy", "pruning time (s)"):
        others.add_column(col, justify="right")
    for crit, (m, secs, _) in results.items():
        others.add_row(crit, f"{m.accuracy:.3f}", f"{secs:.1f}")
    console.print(others)
    out.mkdir(parents=True, exist_ok=True)
    plan.save(out / "plan.json")
    console.print(f"plan written to {out / 'plan.json'}")


KIND_NOUNS = {"hidden": "hidden dims"}
"""How the summary names atoms of a kind (default: the kind plus "s")."""


# ---- shared plumbing ------------------------------------------------------------------------

MODEL_HELP = ("timm or torchvision model name, 'timm:NAME' / 'torchvision:NAME', a local Hugging "
              "Face folder, or 'module:factory' (a callable returning a model or (model, "
              "example_inputs)).")
DATA_HELP = ("'fashion-mnist[:train|:test]', an ImageFolder directory, a .csv/.jsonl of texts "
             "with labels, or 'module:function' yielding batches.")


def friendly(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Errors become one red line and exit code 1 (SURGERY_DEBUG=1: the full traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:
            from rich.markup import escape

            cli_error = type(exc).__module__.startswith(("click", "typer"))
            if os.environ.get("SURGERY_DEBUG") or cli_error:
                raise
            from surgery.errors import SurgeryError

            kind = "" if isinstance(exc, (SurgeryError, ValueError, OSError)) else \
                f"{type(exc).__name__}: "
            err_console.print(f"[bold red]error:[/] {escape(kind + str(exc))}")
            if kind:
                err_console.print("(set SURGERY_DEBUG=1 for the traceback)")
            raise typer.Exit(1) from None

    return wrapper


class Stages:
    """Rich progress bars, one per stage; ``stages(stage, i)`` marks item ``i`` of it done (the
    callback ``surgery.prune(progress=...)`` takes)."""

    LABELS = {"calibrate": "calibrating (batches)", "score": "scoring groups top-down",
              "search": "trying per-kind cut rates (candidates)"}

    def __init__(self, progress: Progress, totals: dict[str, int | None] | None = None) -> None:
        self.progress, self.totals, self.tasks = progress, dict(totals or {}), {}

    def __call__(self, stage: str, i: int) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task(self.LABELS.get(stage, stage),
                                                      total=self.totals.get(stage))
        self.progress.update(self.tasks[stage], completed=i + 1)

    def callback(self, stage: str) -> Callable[[int], None]:
        return lambda i: self(stage, i)

    def finish(self) -> None:
        done = {t.id: t.completed for t in self.progress.tasks}
        for task in self.tasks.values():
            self.progress.update(task, total=done.get(task, 0), completed=done.get(task, 0))


@contextlib.contextmanager
def stages(totals: dict[str, int | None] | None = None) -> Iterator[Stages]:
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        s = Stages(progress, totals)
        try:
            yield s
        finally:
            s.finish()


def _device(name: str, threads: int = 0) -> str:
    import torch

    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}.")
    if threads:
        torch.set_num_threads(threads)
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device; use --device cpu.")
    return name


def _floats(text: str | None, what: str) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} must be numbers separated by commas.") from exc


def _kind_weights(text: str | None) -> dict[str, float] | str | None:
    """``--kind-weights``: ``search``, or ``kind=weight`` pairs separated by commas."""
    if not text or text == "search":
        return text or None
    try:
        return {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
    except ValueError as exc:
        raise ValueError(f"--kind-weights {text!r} must be 'search' or kind=weight pairs "
                         "separated by commas, e.g. neuron=1,head=0.5,hidden=0.25.") from exc


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise ValueError(f"{what} {text!r} must be integers separated by commas.") from exc
    if not values or min(values) < 1:
        raise ValueError(f"{what} {text!r} must be positive integers, like 1,32.")
    return values


def command_line(ctx: typer.Context) -> str:
    """The running command with every option spelled out (what the report says to rerun)."""
    parts = ["surgery", ctx.info_name or ""]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.param_type_name == "argument":
            parts.append(str(value))
        elif value is None or not param.opts:
            continue
        elif getattr(param, "is_flag", False):
            if value:
                parts.append(param.opts[0])
            elif param.secondary_opts:
                parts.append(param.secondary_opts[0])
        else:
            parts += [param.opts[0], str(value)]
    return shlex.join(parts)


@contextlib.contextmanager
def atomic_folder(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it is renamed to ``out`` (replacing
    it when ``overwrite``), on any failure it is removed (and parents this created): a failed
    run leaves nothing behind."""
    out = Path(out).absolute()
    _check_out(out, overwrite)
    created: list[Path] = []
    p = out.parent
    while not p.exists():
        created.append(p)
        p = p.parent
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~umask)
        for f in tmp.rglob("*"):
            os.chmod(f, (0o777 if f.is_dir() else 0o666) & ~umask)
        if out.exists():
            old = out.with_name(f"{tmp.name[:-len('.partial')]}.old")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for c in created:
            with contextlib.suppress(OSError):
                c.rmdir()
        raise


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {str(out)!r} exists and is not a folder.")
    if out.exists() and not overwrite:
        raise ValueError(f"--out {str(out)!r} already exists; pass --overwrite or another --out.")


def _load(spec: str, **options: Any):
    from surgery.cli.specs import load_model, parse_size

    options["input_size"] = parse_size(options.get("input_size"))
    with console.status(f"loading {spec}..."):
        return load_model(spec, **options)


def _label2id(model: Any) -> dict[str, int] | None:
    mapping = getattr(getattr(model, "config", None), "label2id", None)
    return dict(mapping) if mapping else None


def _summary_table(title: str, rows: list[list[str]]) -> Table:
    table = Table(title=title)
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    return table


# Options shared by the commands that build a model from a spec.
CHECKPOINT = typer.Option(None, "--checkpoint", help="Weights: .safetensors or .pth state dict.")
INPUT_SIZE = typer.Option(None, "--input-size", help="Input shape without batch, e.g. 3,224,224.")
NUM_CLASSES = typer.Option(None, "--num-classes", help="Classifier size for timm/torchvision.")
SEQ_LEN = typer.Option(128, "--seq-len", help="Token sequence length for text models.")
TOKENIZER = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the model's).")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
THREADS = typer.Option(0, "--threads", help="CPU threads for torch (0: torch's default; 1 is "
                                            "steadier on a busy machine).")
RESIZE = typer.Option(None, "--resize", help="Images: shorter side before the centre crop.")
MEAN = typer.Option(None, "--mean", help="Images: normalisation mean, e.g. 0.5,0.5,0.5.")
STD = typer.Option(None, "--std", help="Images: normalisation std.")
TEXT_COLUMN = typer.Option(None, "--text-column", help="Texts: the column with the text.")
LABEL_COLUMN = typer.Option("label", "--label-column", help="Texts: the column with the label.")


# ---- inspect --------------------------------------------------------------------------------

@app.command()
@friendly
def inspect(
    model: str = typer.Argument(..., help=MODEL_HELP),
    graph: Optional[Path] = typer.Option(None, "--graph",
                                         help="Draw the group structure to this .svg or .png."),
    checkpoint: Optional[Path] = CHECKPOINT,
    input_size: Optional[str] = INPUT_SIZE,
    num_classes: Optional[int] = NUM_CLASSES,
    seq_len: int = SEQ_LEN,
    tokenizer: Optional[str] = TOKENIZER,
    size: Optional[int] = typer.Option(None, hidden=True, help="Old spelling of --input-size."),
) -> None:
    """Show a model's coupled channel groups (sizes, prunable or why not), params and MACs."""
    import surgery
    from surgery.graph.groups import OUTPUT

    if size is not None and input_size is None:
        input_size = f"3,{size},{size}"
    if graph is not None and graph.suffix.lower() not in (".svg", ".png", ".pdf"):
        raise ValueError(f"--graph {str(graph)!r} must end in .svg or .png.")
    loaded = _load(model, checkpoint=checkpoint, input_size=input_size, num_classes=num_classes,
                   seq_len=seq_len, tokenizer=tokenizer)
    x = loaded.example_inputs(1)
    with console.status("tracing and finding coupled channel groups..."):
        coupling = surgery.couple(loaded.model, x)
    table = Table(title=f"{model}: {len(coupling.prunable)} prunable of "
                        f"{len(coupling.groups)} coupled groups")
    for col in ("id", "group", "kind", "atoms", "params touched", "read into", "prunable"):
        numeric = col in ("id", "atoms", "params touched")
        table.add_column(col, justify="right" if numeric else "left", overflow="fold")
    for g in coupling.groups:
        targets = sorted({r.target for r in coupling.relations if r.group == g.id})
        into = ", ".join("output" if t == OUTPUT else str(t) for t in targets) or "-"
        table.add_row(str(g.id), g.name, g.kind, str(g.atoms), str(len(g.params)), into,
                      "yes" if g.prunable else f"no: {g.reason}")
    console.print(table)
    console.print(f"params {surgery.count_params(loaded.model):,}  "
                  f"MACs {surgery.count_macs(loaded.model, x):,} (one sample, input "
                  f"{_describe_inputs(loaded.inputs)})")
    if graph is not None:
        from surgery.cli.report import draw_groups

        graph.parent.mkdir(parents=True, exist_ok=True)
        draw_groups(coupling, graph)
        console.print(f"group structure drawn to {graph}")


def _describe_inputs(inputs: dict[str, Any]) -> str:
    if inputs["kind"] == "image":
        return "x".join(str(v) for v in inputs["shape"])
    if inputs["kind"] == "text":
        return f"{inputs['seq_len']} tokens"
    return "from the factory"


# ---- prune ----------------------------------------------------------------------------------

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
    from surgery.cli.specs import load_data, save_pruned
    from surgery.cli.report import measure, write_report

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
        with atomic_folder(out, overwrite) as tmp:
            save_pruned(tmp, loaded, pruned, plan)  # first: it replaces the folder whole
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


# ---- eval / bench / export ------------------------------------------------------------------

def _open_folder(folder: Path, device: str):
    from surgery.cli.specs import load_pruned

    with console.status(f"rebuilding the pruned model from {folder}..."):
        pruned = load_pruned(folder, device)
    dense = None
    try:
        with console.status("rebuilding the dense model..."):
            dense = pruned.dense().to(device)
    except Exception as exc:  # the comparison is a bonus; the pruned model still runs
        err_console.print(f"[yellow]warning:[/] no dense model to compare with: {exc}")
    return pruned, dense


def _write_json(path: Optional[Path], payload: dict[str, Any]) -> None:
    if path is not None:
        path.write_text(json.dumps(payload, indent=1))
        console.print(f"results written to {path}")


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
    from surgery.cli.specs import load_data
    from surgery.cli.report import Measurement, measure, summary_rows

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


@app.command()
@friendly
def bench(
    folder: Path = typer.Argument(..., help="A folder written by 'surgery prune'."),
    batch_sizes: str = typer.Option("1,32", help="Batch sizes, comma separated."),
    repeats: int = typer.Option(10, help="Timed runs per batch size (median reported)."),
    device: str = DEVICE,
    threads: int = THREADS,
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write results as JSON."),
) -> None:
    """Latency per batch size, params and MACs, dense vs pruned."""
    import torch

    from surgery.counting import count_macs, count_params, measure_latency
    from surgery._core.batches import to_device

    sizes = _ints(batch_sizes, "--batch-sizes")
    if repeats < 1:
        raise ValueError("--repeats must be >= 1.")
    dev = _device(device, threads)
    pruned, dense = _open_folder(folder, dev)
    models = {"dense": dense, "pruned": pruned.model} if dense is not None else \
        {"pruned": pruned.model}
    one = to_device(pruned.example_inputs(1), torch.device(dev))
    results: dict[str, Any] = {name: {"params": count_params(m), "macs": count_macs(m, one),
                                      "latency_ms": {}} for name, m in models.items()}
    with stages({"benchmark": len(sizes) * len(models)}) as bars:
        step = 0
        for b in sizes:
            x = to_device(pruned.example_inputs(b), torch.device(dev))
            for name, m in models.items():
                results[name]["latency_ms"][b] = measure_latency(m, x, repeats=repeats) * 1e3
                bars("benchmark", step)
                step += 1
    table = Table(title=f"{folder}: latency on {dev} (median of {repeats})")
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right")
    d, p = results.get("dense"), results["pruned"]
    for key, label in (("params", "parameters"), ("macs", "MACs / sample")):
        table.add_row(label, f"{d[key]:,}" if d else "n/a", f"{p[key]:,}",
                      f"{p[key] / d[key]:.2f}x" if d and d[key] else "")
    for b in sizes:
        dl = d["latency_ms"][b] if d else None
        pl = p["latency_ms"][b]
        table.add_row(f"batch {b} (ms)", f"{dl:.2f}" if dl else "n/a", f"{pl:.2f}",
                      f"{dl / pl:.2f}x faster" if dl and pl else "")
    console.print(table)
    _write_json(json_out, results)


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
    from surgery.io.onnx import export_onnx
    from surgery.cli.specs import load_pruned

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
