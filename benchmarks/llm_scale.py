"""What pruning a Llama-3-8B layout costs per decoder layer: peak memory and time, measured on
random-init models of that width with 1 and 2 layers on this CPU, extrapolated to 32 layers.

The layout is Llama-3-8B's (hidden 4096, FFN 14336, 32 query / 8 key-value heads of 128,
vocabulary 128,256, untied LM head), float32, random weights: memory and time depend on the
shapes, not on what the weights learned. Each depth runs in a fresh interpreter (its own
peak-memory counter): ``surgery.prune`` of 20% of the decoder layers' parameters (KV groups
and FFN channels, MI with compensation) on ``--windows`` windows of ``--tokens`` random token
ids. The difference between the two depths is the cost of one more layer; the rest (the
embeddings, the 128k-way head, the sketch of the output) is paid once.

Usage: ``python benchmarks/llm_scale.py [--windows 8] [--tokens 256] [--memory-gib 4]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from _common import machine, markdown_table, peak_rss_mb, run_child, write_result

NAME = "llm_scale"
LAYOUT = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
              num_key_value_heads=8, head_dim=128, vocab_size=128256,
              tie_word_embeddings=False, max_position_embeddings=8192, rope_theta=500000.0)
"""Llama-3-8B's configuration, less its 32 layers."""


def child(layers: int, windows: int, tokens: int, memory_gib: float) -> dict:
    """Prune one random-init model of ``layers`` layers and report its costs (one JSON line)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import surgery
    from surgery.stats.calibration import calibration_bytes

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, **LAYOUT)
    model = LlamaForCausalLM(config).eval()
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    after_build = peak_rss_mb()
    ids = torch.randint(0, LAYOUT["vocab_size"], (windows, tokens))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(2)]
    opts = surgery.PruneOptions(sparsity=0.2, budget="params", budget_scope=("model.layers",),
                                kinds=frozenset({"head", "neuron"}),
                                calibration_memory=int(memory_gib * 2**30))
    start = time.perf_counter()
    coupling = surgery.couple(model, batches[0])
    scored = [i for i, rel in enumerate(coupling.relations)  # the groups this prune cuts
              if coupling.groups[rel.group].kind in opts.kinds]
    predicted = sum(calibration_bytes(coupling, scored).values()) / 2**20
    traced = time.perf_counter() - start
    pruned, plan = surgery.prune(model, batches[0], batches, options=opts, inplace=True)
    seconds = time.perf_counter() - start
    with torch.inference_mode():
        finite = bool(torch.isfinite(pruned(**batches[0]).logits).all())
    stages = plan.extra.get("calibration_stages", {})
    return {"layers": layers, "weights_mb": weights_mb, "peak_mb": peak_rss_mb(),
            "model_mb": after_build, "stats_mb": predicted, "seconds": seconds,
            "trace_s": traced, "passes": stages.get("passes", 1),
            "stage_peak_mb": stages.get("peak_bytes", 0) / 2**20, "finite": finite}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--memory-gib", type=float, default=4.0,
                        help="calibration_memory: statistics held at once")
    parser.add_argument("--child", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.windows, args.tokens, args.memory_gib)))
        return
    common = ["--windows", str(args.windows), "--tokens", str(args.tokens),
              "--memory-gib", str(args.memory_gib)]
    runs = [run_child(__file__, "--child", str(n), *common) for n in (1, 2)]
    one, two = runs
    per = {k: two[k] - one[k] for k in ("weights_mb", "peak_mb", "seconds")}
    fixed_s = max(one["seconds"] - per["seconds"], 0.0)  # timing noise can make it < 0
    rows = [{"decoder layers": r["layers"], "weights (MiB)": f"{r['weights_mb']:,.0f}",
             "peak RSS (MiB)": f"{r['peak_mb']:,.0f}",
             "statistics if held at once (MiB)": f"{r['stats_mb']:,.0f}",
             "calibration passes": r["passes"],
             "largest stage (MiB)": f"{r['stage_peak_mb']:,.0f}" if r["stage_peak_mb"] else "-",
             "prune time (s)": f"{r['seconds']:.0f}", "output finite": r["finite"]}
            for r in runs]
    rows.append({"decoder layers": "one more layer", "weights (MiB)": f"{per['weights_mb']:,.0f}",
                 "peak RSS (MiB)": f"{per['peak_mb']:,.0f}",
                 "statistics if held at once (MiB)": f"{two['stats_mb'] - one['stats_mb']:,.0f}",
                 "prune time (s)": f"{per['seconds']:.0f}"})
    columns = list(rows[0])
    full_weights = one["weights_mb"] + 31 * per["weights_mb"]
    stats32 = one["stats_mb"] + 31 * (two["stats_mb"] - one["stats_mb"])
    body = (
        f"Llama-3-8B layout (hidden 4096, FFN 14336, 32 query / 8 KV heads, vocabulary 128,256), "
        f"random init, float32, on this CPU ({machine()}); 20% of the decoder layers' "
        f"parameters removed (KV groups and FFN channels, `mi`, compensation), "
        f"{args.windows} calibration windows of {args.tokens} tokens, `calibration_memory` "
        f"{args.memory_gib:g} GiB. Each depth in a fresh process.\n\n"
        + markdown_table(rows, columns)
        + "\n\nExtrapolated to 32 layers: weights "
        f"{full_weights / 1024:,.1f} GiB in float32 ({full_weights / 2048:,.1f} GiB in "
        f"bfloat16); statistics of the cut groups, if all were held at once, "
        f"{stats32 / 1024:,.1f} GiB: staged calibration holds at most `calibration_memory` of "
        f"them (one pass over the data per stage). Peak memory grows by "
        f"{per['peak_mb']:,.0f} MiB per layer (its weights are {per['weights_mb']:,.0f}), so 32 "
        f"layers would peak near {(one['peak_mb'] + 31 * per['peak_mb']) / 1024:,.1f} GiB in "
        f"float32: the weights plus one stage, the selection's working matrices and one "
        f"batch's activations, which do not grow with depth. "
        f"CPU time here: " + (f"{fixed_s:,.0f} s once plus " if fixed_s >= 0.5 else "")
        + f"{per['seconds']:,.0f} s per layer, "
        f"{fixed_s + 32 * per['seconds']:,.0f} s for 32 layers on this machine's cores "
        "(a GPU was not measured).\n\n"
        f"Reproduce: `python benchmarks/llm_scale.py --windows {args.windows} --tokens "
        f"{args.tokens} --memory-gib {args.memory_gib:g}`.")
    write_result(NAME, "Pruning a Llama-3-8B layout: memory and time per decoder layer", body)


if __name__ == "__main__":
    sys.exit(main())
