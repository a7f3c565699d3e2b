"""``surgery bench``: latency per batch size, params and MACs, dense vs pruned."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from surgery.cli._common import (
    Device,
    JsonOut,
    PrunedFolderArg,
    Threads,
    app,
    console,
    friendly,
    open_folder,
    parse_ints,
    pick_device,
    stages,
    write_json,
)


@app.command()
@friendly
def bench(
    folder: PrunedFolderArg,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma separated.")] = "1,32",
    rounds: Annotated[int, typer.Option(
        "--rounds", "--repeats", min=1,
        help="Interleaved rounds per batch size: each round times dense and pruned once, in "
             "alternating order (median and quartiles reported).")] = 9,
    new_tokens: Annotated[int, typer.Option(
        min=0, help="Causal language models: tokens generated per timed generation, with "
                    "the KV cache (0: skip the generation speed).")] = 32,
    device: Device = "auto",
    threads: Threads = 0,
    json_out: JsonOut = None,
) -> None:
    """Latency per batch size, params and MACs, dense vs pruned; for a causal language model
    the latency is the prefill of --seq-len tokens, and generation tokens/s is measured too."""
    import torch

    from surgery._core.batches import to_device
    from surgery.counting import count_macs, count_params
    from surgery.timing import Speedup, Timing, time_interleaved

    sizes = parse_ints(batch_sizes, "--batch-sizes")
    dev = pick_device(device, threads)
    pruned, dense = open_folder(folder, dev)
    models = {"dense": dense, "pruned": pruned.model} if dense is not None else \
        {"pruned": pruned.model}
    one = to_device(pruned.example_inputs(1), torch.device(dev))
    results: dict[str, Any] = {name: {"params": count_params(m), "macs": count_macs(m, one),
                                      "latency_ms": {}} for name, m in models.items()}
    speedups: dict[int, Speedup] = {}
    with stages({"benchmark (batch sizes)": len(sizes)}) as bars:
        for step, b in enumerate(sizes):
            x = to_device(pruned.example_inputs(b), torch.device(dev))
            samples = time_interleaved(models, x, rounds=rounds)
            for name, seconds in samples.items():
                results[name]["latency_ms"][b] = vars(Timing.of(seconds))
            if dense is not None:
                speedups[b] = Speedup.of(samples["dense"], samples["pruned"])
            bars("benchmark (batch sizes)", step)
    causal = pruned.inputs.get("kind") == "causal"
    generation = None
    if causal and new_tokens:
        from surgery.language import generation_speed

        with console.status(f"timing generation of {new_tokens} tokens..."):
            prompt = to_device(pruned.example_inputs(1)["input_ids"], torch.device(dev))
            generation = generation_speed(models, prompt, new_tokens=new_tokens,
                                          rounds=max(3, rounds // 2))
        for name, rate in generation.tokens_per_s.items():
            results[name]["generation_tokens_per_s"] = rate
    what = f"prefill of {pruned.inputs['seq_len']} tokens" if causal else "latency"
    table = Table(title=f"{folder}: {what} on {dev} (median of {rounds} interleaved rounds)")
    for col in ("", "dense", "pruned", "change"):
        table.add_column(col, justify="right")
    d, p = results.get("dense"), results["pruned"]
    for key, label in (("params", "parameters"), ("macs", "MACs / sample")):
        table.add_row(label, f"{d[key]:,}" if d else "n/a", f"{p[key]:,}",
                      f"{p[key] / d[key]:.2f}x" if d and d[key] else "")
    for b in sizes:
        dl = d["latency_ms"][b]["median_ms"] if d else None
        pl = p["latency_ms"][b]["median_ms"]
        table.add_row(f"batch {b} (ms)", f"{dl:.2f}" if dl else "n/a", f"{pl:.2f}",
                      speedups[b].text() if b in speedups else "")
    if generation is not None:
        rates = generation.tokens_per_s
        table.add_row(f"generation, {generation.new_tokens} tokens after "
                      f"{pruned.inputs['seq_len']} (tokens/s)",
                      f"{rates['dense']:.1f}" if "dense" in rates else "n/a",
                      f"{rates['pruned']:.1f}",
                      generation.speedup.text() if generation.speedup else "")
    console.print(table)
    payload = {**results, "speedup": {b: vars(s) for b, s in speedups.items()}}
    if generation is not None and generation.speedup is not None:
        payload["generation_speedup"] = vars(generation.speedup)
    write_json(json_out, payload)
