"""The real all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes, pruned by MI with no retraining.

For 30%, 50% and 75% of encoder parameters removed (heads, FFN neurons and hidden dims, by
the joint MI criterion with compensation, target = the dense model's output, 512 calibration
snippets, kept channels in multiples of 16): test accuracy, encoder parameters, MACs and CPU
latency (batch 32, length 64) against the dense model, measured side by side; pruning wall time against the time of the
calibration forward passes alone (target <= 3x); latency speedup against the MAC reduction
ratio (target >= 0.8x).

Uniform widths, side by side in the same run: for 50% and 75% (``--uniform-sizes``) the same
prune with ``uniform_widths=True``, whose folder is a plain Hugging Face one (checked: saved
with ``surgery.io.save`` and read back with ``AutoModelForSequenceClassification.from_pretrained``,
which must give the same accuracy). A BERT config derives the head size from the hidden size,
so only FFN neurons are cut; a budget they cannot meet is reported with the error it raises.

Usage: ``python benchmarks/minilm_rotten_tomatoes.py [--sizes 0.3,0.5,0.75] [--calib 512]
[--round-to 16] [--uniform-sizes 0.5,0.75]``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import machine, markdown_table, write_result

SCOPE = "bert.encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="0.3,0.5,0.75")
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--criterion", default="mi")
    parser.add_argument("--round-to", type=int, default=16,
                        help="kept channels per group in multiples of this (1: no rounding)")
    parser.add_argument("--uniform-sizes", default="0.5,0.75",
                        help="sizes also pruned with uniform_widths=True (a plain Hugging Face "
                             "folder), next to the default; empty: none")
    args = parser.parse_args()

    import surgery
    from surgery.counting import accuracy
    from surgery.demo import minilm_rotten_tomatoes
    from surgery.errors import AssetMissing

    try:
        task = minilm_rotten_tomatoes()
    except AssetMissing as exc:
        sys.exit(str(exc))
    model = task.model
    test = task.batches("test")
    calib = task.batches("train", 32, args.calib)
    example = {k: v[:2] for k, v in calib[0].items() if k != "labels"}
    bench = {k: v[:32] for k, v in test[0].items() if k != "labels"}
    one = {k: v[:1] for k, v in bench.items()}

    def encoder_params(m: torch.nn.Module) -> int:
        return sum(p.numel() for n, p in m.named_parameters() if n.startswith(SCOPE))

    def calibration_forwards() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for b in calib:
                model(**{k: v for k, v in b.items() if k != "labels"})
        return time.perf_counter() - start

    calibration_forwards()  # warm-up: the first pass over the data is slower
    calib_before = calibration_forwards()

    dense = {"acc": accuracy(model, test)[0], "enc": encoder_params(model),
             "macs": surgery.count_macs(model, one)}
    rows = []
    pruned_models = {}
    settings = dict(budget="params", budget_scope=SCOPE, criterion=args.criterion,
                    round_to=args.round_to)
    for size in [float(s) for s in args.sizes.split(",")]:
        start = time.perf_counter()
        pruned, plan = surgery.prune(model, example, calib, sparsity=size, **settings)
        seconds = time.perf_counter() - start
        # The calibration forwards timed just before and after (the faster one: the machine
        # is shared, and a slow baseline would flatter the ratio).
        calib_after = calibration_forwards()
        pruned_models[size] = (pruned, plan, seconds, min(calib_before, calib_after))
        calib_before = calib_after
    # Latency side by side, dense timed between every pruned model to expose drift.
    dense_lat = []
    for size, (pruned, plan, seconds, calib_seconds) in pruned_models.items():
        dense_lat.append(surgery.measure_latency(model, bench, repeats=10))
        lat = surgery.measure_latency(pruned, bench, repeats=10)
        macs = surgery.count_macs(pruned, one)
        mac_ratio = dense["macs"] / macs
        speedup = dense_lat[-1] / lat
        rows.append({
            "encoder params removed": f"{1 - encoder_params(pruned) / dense['enc']:.1%}",
            "accuracy": f"{accuracy(pruned, test)[0]:.3f} (dense {dense['acc']:.3f})",
            "encoder params": f"{encoder_params(pruned) / 1e6:.2f} M",
            "MACs": f"{macs / 1e6:.0f} M ({mac_ratio:.2f}x fewer)",
            "latency b32 l64": f"{lat * 1e3:.0f} ms vs {dense_lat[-1] * 1e3:.0f} ms "
                               f"({speedup:.2f}x; {speedup / mac_ratio:.2f} of MAC ratio)",
            "kept (heads / neurons / hidden)": kept_summary(plan),
            "pruning time": f"{seconds:.1f} s = {seconds / calib_seconds:.2f}x calibration "
                            f"({calib_seconds:.2f} s)",
        })
        print(rows[-1], flush=True)
    uniform = uniform_rows(model, example, calib, test, settings, dense, pruned_models,
                           [float(s) for s in args.uniform_sizes.split(",") if s.strip()],
                           encoder_params)
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())  # 1, 5, 15 minutes, at the end
    body = (
        f"all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes (2 epochs, reference protocol), test "
        f"set of {len(task.test['labels'])} snippets; criterion `{args.criterion}` with "
        f"least-squares compensation, target = dense output, {args.calib} calibration snippets "
        f"(the time of their plain forward passes, warm, is the smaller of the runs just before "
        f"and after each prune); kept channels rounded to multiples of {args.round_to}; no "
        f"retraining. Dense: "
        f"{dense['enc'] / 1e6:.2f} M encoder parameters, {dense['macs'] / 1e6:.0f} M MACs per "
        f"snippet.\nMachine: {machine()}; load average {load}: latency and pruning time "
        "vary with the load of a shared machine, accuracy does not.\n\n"
        + markdown_table(rows, list(rows[0]))
        + "\n\nTargets: pruning time <= 3x the calibration forwards; latency speedup >= 0.8x "
        "the MAC reduction ratio.\n"
        + (UNIFORM_INTRO + markdown_table(uniform, UNIFORM_COLUMNS) + "\n" if uniform else "")
        + f"\nReproduce: `python benchmarks/minilm_rotten_tomatoes.py --sizes {args.sizes} "
        f"--calib {args.calib} --round-to {args.round_to} --uniform-sizes {args.uniform_sizes}`.\n"
    )
    write_result("minilm_rotten_tomatoes", "MiniLM on Rotten Tomatoes: pruning by MI", body)


UNIFORM_INTRO = (
    "\n## Uniform widths: a plain Hugging Face folder\n\n"
    "The same prunes with `uniform_widths=True` (`--uniform-widths`), in the same run: every "
    "layer keeps one width per kind, and only what a plain `BertConfig` can express is cut. It "
    "derives the head size from `hidden_size`, so heads and hidden dims stay whole and FFN "
    "neurons (`intermediate_size`) carry the whole budget. Each folder is written by "
    "`surgery.io.save` and read back by transformers' "
    "`AutoModelForSequenceClassification.from_pretrained`; *loads with* says what reads it.\n\n"
)

UNIFORM_COLUMNS = ["target (encoder params)", "default: removed / accuracy",
                   "default: kept (h / n / hid)", "default: loads with",
                   "uniform widths: removed / accuracy", "uniform: kept (h / n / hid)",
                   "uniform: loads with"]


def kept_summary(plan) -> str:
    """Kept/total atoms per kind: heads / neurons / hidden dims."""
    kinds: dict[str, tuple[int, int]] = {}
    for g in plan.groups:
        a, k = kinds.get(g.kind, (0, 0))
        kinds[g.kind] = (a + g.atoms, k + len(g.kept))
    return " / ".join(f"{kinds[k][1]}/{kinds[k][0]}" for k in ("head", "neuron", "hidden")
                      if k in kinds)


def loads_with(pruned, plan, dense_model, test) -> tuple[str, float | None]:
    """Save ``pruned`` with surgery.io.save; what reads the folder back, and the accuracy of
    the model transformers' from_pretrained builds from it (None when it cannot)."""
    from transformers import AutoModelForSequenceClassification

    from surgery import io
    from surgery.counting import accuracy

    with tempfile.TemporaryDirectory() as tmp:
        folder = io.save(pruned, Path(tmp) / "pruned", plan, dense_model)
        if not (folder / "config.json").exists():
            return "surgery.io.load only", None
        hf = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        return "surgery.io.load and from_pretrained", accuracy(hf, test)[0]


def uniform_rows(model, example, calib, test, settings, dense, pruned_models, sizes,
                 encoder_params) -> list[dict]:
    """Default vs uniform_widths at each size; the default's prune is reused from the main
    table when it is there."""
    import surgery
    from surgery.counting import accuracy
    from surgery.errors import BudgetError

    rows = []
    for size in sizes:
        default = pruned_models.get(size)
        if default is None:
            default = surgery.prune(model, example, calib, sparsity=size, **settings)
        small, plan = default[0], default[1]
        row = {"target (encoder params)": f"{size:.0%}",
               "default: removed / accuracy": f"{1 - encoder_params(small) / dense['enc']:.1%} "
                                               f"/ {accuracy(small, test)[0]:.3f}",
               "default: kept (h / n / hid)": kept_summary(plan),
               "default: loads with": loads_with(small, plan, model, test)[0]}
        try:
            small, plan = surgery.prune(model, example, calib, sparsity=size,
                                        uniform_widths=True, **settings)
        except BudgetError as exc:
            row["uniform widths: removed / accuracy"] = f"refused: {exc}"
            rows.append(row)
            print(row, flush=True)
            continue
        loads, hf_accuracy = loads_with(small, plan, model, test)
        acc = accuracy(small, test)[0]
        row.update({
            "uniform widths: removed / accuracy": f"{1 - encoder_params(small) / dense['enc']:.1%}"
                                                  f" / {acc:.3f}",
            "uniform: kept (h / n / hid)": kept_summary(plan),
            "uniform: loads with": loads + (f" (accuracy {hf_accuracy:.3f})"
                                            if hf_accuracy is not None else ""),
        })
        rows.append(row)
        print(row, flush=True)
    return rows


if __name__ == "__main__":
    main()
