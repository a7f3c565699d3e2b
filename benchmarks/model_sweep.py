"""Model sweep (issue 5): does every model trace, prune, run and reload, with surgery and with
Torch-Pruning 1.6, on the same list in the same run?

The list:

* every torchvision classification model (``torchvision.models.list_models(module=...)``);
* the smallest model of every timm family: ``timm.list_models()`` grouped by the Python module
  that defines each model, the one with the fewest parameters per module (counted on the
  ``meta`` device; cached per timm version in ``~/.cache/surgery/``);
* the Hugging Face encoders the BERT and ViT plugins claim, with small configs.

All random init (no hub). Per model, in a process of its own, forked from the driver after the
imports (a hang or a crash costs that model only; each tool also has a time limit):

* surgery: ``couple`` (trace), ``prune(x, sparsity=0.3, budget="macs",
  criterion="magnitude")``, run (same output shapes), reload (``surgery.io.save`` +
  ``surgery.io.load`` give the same outputs);
* Torch-Pruning: ``MetaPruner`` with ``GroupMagnitudeImportance`` (the dependency graph is the
  trace stage), channel ratio ``TP_RATIO`` per layer, every layer writing the class logits
  ignored, attention heads declared as in its own timm/HF examples; ``pruner.step()``; run;
  reload with its own serialization (``tp.state_dict`` -> ``tp.save`` -> ``tp.load`` ->
  ``tp.load_state_dict`` onto a fresh unpruned model).

Usage::

    python benchmarks/model_sweep.py                       # the full sweep, writes the doc
    python benchmarks/model_sweep.py --only timm --limit 5 # a quick look, doc not written
    python benchmarks/model_sweep.py --models resnet18,deit_tiny_patch16_224
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import signal
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

SPARSITY = 0.3
TP_RATIO = 0.17  # per-layer channel ratio; (1 - 0.17)^2 ~ 0.69 of a conv's MACs stay
STAGES = ("trace", "prune", "run", "reload")
TOOLS = ("surgery", "tp")
SMALL = 64  # input side used where the model allows it
MARK = "@@SWEEP "

HF_CLASSES = (
    "BertForSequenceClassification", "RobertaForSequenceClassification",
    "DistilBertForSequenceClassification", "ElectraForSequenceClassification",
    "XLMRobertaForSequenceClassification", "MPNetForSequenceClassification",
    "ViTForImageClassification", "DeiTForImageClassification",
)


# ---------------------------------------------------------------------------------------
# The list
# ---------------------------------------------------------------------------------------


def torchvision_models() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def _meta_params(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False)
        return sum(p.numel() for p in model.parameters())
    except Exception:
        return None


def timm_smallest(refresh: bool = False) -> dict[str, dict[str, Any]]:
    """``{module: {"model": name, "params": n, "candidates": k}}`` for every timm module."""
    import timm
    from timm.models import _registry

    cache = Path.home() / ".cache" / "surgery" / f"timm_smallest_{timm.__version__}.json"
    if cache.is_file() and not refresh:
        return json.loads(cache.read_text())
    warnings.filterwarnings("ignore")
    by_module: dict[str, list[str]] = collections.defaultdict(list)
    for name in timm.list_models():
        by_module[_registry._model_to_module[name]].append(name)
    out = {}
    for module, names in sorted(by_module.items()):
        sizes = {n: _meta_params(n) for n in names}
        known = {n: p for n, p in sizes.items() if p is not None}
        best = min(known, key=lambda n: (known[n], n)) if known else sorted(names)[0]
        out[module] = {"model": best, "params": known.get(best), "candidates": len(names)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(out, indent=1))
    return out


def entries(only: str | None, refresh: bool) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    if only in (None, "torchvision"):
        out += [("torchvision", n) for n in torchvision_models()]
    if only in (None, "timm"):
        out += [("timm", v["model"]) for _, v in sorted(timm_smallest(refresh).items())]
    if only in (None, "hf"):
        out += [("hf", n) for n in HF_CLASSES]
    return out


# ---------------------------------------------------------------------------------------
# One model (runs in the worker subprocess)
# ---------------------------------------------------------------------------------------


def _hf_model(name: str):
    import transformers

    cls = getattr(transformers, name)
    if name.startswith(("ViT", "DeiT")):
        config = cls.config_class(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10)
    else:
        kwargs = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, intermediate_size=128,
                      max_position_embeddings=72, num_labels=3)
        if name.startswith("DistilBert"):
            kwargs = dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                          max_position_embeddings=72, num_labels=3)
        if name.startswith("Electra"):
            kwargs["embedding_size"] = 64
        config = cls.config_class(**kwargs)
    return cls(config)


def _hf_inputs(model) -> Any:
    import torch

    g = torch.Generator().manual_seed(1)
    if hasattr(model.config, "image_size"):
        size = model.config.image_size
        return {"pixel_values": torch.randn(1, 3, size, size, generator=g)}
    ids = torch.randint(5, model.config.vocab_size, (1, 16), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build(source: str, name: str):
    """The model (random init, eval mode) and a way to rebuild it, for ``surgery.io``."""
    import torch

    torch.manual_seed(0)
    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None)
    elif source == "timm":
        import timm

        model = timm.create_model(name, pretrained=False)
    else:
        model = _hf_model(name)
    return model.eval()


def candidate_inputs(source: str, name: str, model) -> list[Any]:
    """Example inputs to try, smallest first: the first one the dense model runs on is used."""
    import torch

    def images(h: int, w: int) -> torch.Tensor:
        return torch.randn(1, 3, h, w, generator=torch.Generator().manual_seed(1))

    if source == "hf":
        return [_hf_inputs(model)]
    if source == "torchvision":
        import torchvision

        meta = torchvision.models.get_model_weights(name).DEFAULT.meta
        h, w = meta.get("min_size", (1, 1))
        fixed = getattr(model, "image_size", None)  # ViT: fixed by the builder, not the weights
        sizes = [(fixed, fixed)] if isinstance(fixed, int) else []
        sizes += [(max(SMALL, h), max(SMALL, w)), (224, 224)]
        return [images(*s) for s in dict.fromkeys(sizes)]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    _, h, w = cfg.get("input_size", (3, 224, 224))
    if cfg.get("fixed_input_size"):
        return [images(h, w)]
    mh, mw = (cfg.get("min_input_size") or (3, 1, 1))[1:]
    sizes = [(max(SMALL, mh), max(SMALL, mw)), (max(128, mh), max(128, mw)), (h, w)]
    return [images(*s) for s in dict.fromkeys(sizes)]


def tensors(value: Any) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors(v)]
    return []


def forward(model, x) -> list:
    import torch

    from surgery._core.batches import call

    with torch.no_grad():
        return tensors(call(model, x))


def same_shapes(a: list, b: list) -> bool:
    return [tuple(t.shape) for t in a] == [tuple(t.shape) for t in b]


def same_values(a: list, b: list) -> tuple[bool, float]:
    import torch

    if not same_shapes(a, b):
        return False, float("inf")
    diff = max((float((x - y).abs().max()) for x, y in zip(a, b) if x.numel()), default=0.0)
    return all(torch.allclose(x, y, rtol=1e-4, atol=1e-5) for x, y in zip(a, b)), diff


class StageTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise StageTimeout("time limit reached")


def emit(**record: Any) -> None:
    print(MARK + json.dumps(record), flush=True)


def reason_of(exc: BaseException) -> str:
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


def architecture(source: str, name: str, model):
    from surgery.io import Architecture

    if source == "torchvision":
        return Architecture.torchvision(name)
    if source == "timm":
        return Architecture.timm(name)
    return Architecture.transformers(model)


def run_surgery(source: str, name: str, base, x, dense: list, tmp: Path, stage: list) -> dict:
    import surgery
    import surgery.io

    info: dict[str, Any] = {}
    stage[0] = "trace"
    coupling = surgery.couple(base, x)
    info["groups"] = len(coupling.groups)
    info["prunable"] = len(coupling.prunable)
    emit(tool="surgery", stage="trace", ok=True)
    stage[0] = "prune"
    # prune() traces again; hand it the coupling just found instead (same model, same inputs)
    import surgery.api

    real = surgery.api.couple
    surgery.api.couple = lambda m, i: coupling if (m is base and i is x) else real(m, i)
    try:
        pruned, plan = surgery.prune(base, x, sparsity=SPARSITY, budget="macs",
                                     criterion="magnitude")
    finally:
        surgery.api.couple = real
    info["macs_removed"] = 1 - plan.budget["macs"] / plan.budget["dense_macs"]
    info["params_removed"] = 1 - plan.budget["params"] / plan.budget["dense_params"]
    emit(tool="surgery", stage="prune", ok=True, **info)
    stage[0] = "run"
    out = forward(pruned.eval(), x)
    if not same_shapes(out, dense):
        raise AssertionError(f"output shapes {[tuple(t.shape) for t in out]} differ from the "
                             f"dense {[tuple(t.shape) for t in dense]}")
    emit(tool="surgery", stage="run", ok=True)
    stage[0] = "reload"
    folder = tmp / "surgery"
    surgery.io.save(pruned, folder, plan, architecture(source, name, base))
    loaded = surgery.io.load(folder)
    ok, diff = same_values(forward(loaded, x), out)
    if not ok:
        raise AssertionError(f"reloaded outputs differ (max abs diff {diff:.3g})")
    emit(tool="surgery", stage="reload", ok=True, reload_diff=diff)
    return info


def _num_classes(dense: list) -> int:
    return int(dense[0].shape[-1])


def run_tp(base, x, dense: list, tmp: Path, stage: list) -> dict:
    import torch.nn as nn
    import torch_pruning as tp
    from _common import tp_fix_heads, tp_heads

    from surgery.counting import count_macs

    info: dict[str, Any] = {}
    stage[0] = "trace"
    model = copy.deepcopy(base)
    classes = _num_classes(dense)
    ignored = [m for m in model.modules()
               if (isinstance(m, nn.Linear) and m.out_features == classes)
               or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == classes)]
    heads = tp_heads(model)
    pruner = tp.pruner.MetaPruner(
        model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=TP_RATIO, ignored_layers=ignored, num_heads=heads,
        output_transform=lambda out: sum(t.sum() for t in tensors(out)),
    )
    emit(tool="tp", stage="trace", ok=True)
    stage[0] = "prune"
    dense_macs = count_macs(base, x)
    pruner.step()
    tp_fix_heads(model, pruner, heads)
    emit(tool="tp", stage="prune", ok=True)
    stage[0] = "run"
    model.eval()
    out = forward(model, x)
    if not same_shapes(out, dense):
        raise AssertionError(f"output shapes {[tuple(t.shape) for t in out]} differ from the "
                             f"dense {[tuple(t.shape) for t in dense]}")
    info["macs_removed"] = 1 - count_macs(model, x) / dense_macs
    info["params_removed"] = 1 - sum(p.numel() for p in model.parameters()) / sum(
        p.numel() for p in base.parameters())
    emit(tool="tp", stage="run", ok=True, **info)
    stage[0] = "reload"
    path = tmp / "tp.pth"
    tp.save(tp.state_dict(model), path)
    fresh = base  # last use of the dense model: it becomes the reloaded one
    loaded = tp.load_state_dict(fresh, state_dict=tp.load(path, weights_only=False))
    ok, diff = same_values(forward(loaded.eval(), x), out)
    if not ok:
        raise AssertionError(f"reloaded outputs differ (max abs diff {diff:.3g})")
    emit(tool="tp", stage="reload", ok=True, reload_diff=diff)
    return info


def worker(source: str, name: str, tools: list[str], limit: float) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SWEEP_THREADS", "1")))
    warnings.filterwarnings("ignore")
    t0 = time.time()
    try:
        model = build(source, name)
        x = dense = None
        errors = []
        for cand in candidate_inputs(source, name, model):
            try:
                dense = forward(model, cand)
                x = cand
                break
            except Exception as exc:  # too small for this model: try the next size
                errors.append(reason_of(exc))
        if x is None:
            raise RuntimeError(f"the dense model runs on none of the inputs: {errors[-1]}")
    except Exception as exc:
        emit(tool="setup", stage="build", ok=False, reason=reason_of(exc))
        return
    shape = {k: list(v.shape) for k, v in x.items()} if isinstance(x, dict) else list(x.shape)
    emit(tool="setup", stage="build", ok=True, input=shape, seconds=time.time() - t0,
         params=sum(p.numel() for p in model.parameters()))
    signal.signal(signal.SIGALRM, _alarm)
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for tool in tools:
            stage = ["trace"]
            start = time.time()
            signal.alarm(int(limit))
            try:
                if tool == "surgery":
                    run_surgery(source, name, model, x, dense, Path(tmp), stage)
                else:
                    run_tp(model, x, dense, Path(tmp), stage)
            except StageTimeout:
                emit(tool=tool, stage=stage[0], ok=False,
                     reason=f"Timeout: over {limit:.0f} s (stage {stage[0]})")
            except BaseException as exc:  # noqa: BLE001 - every failure is a result
                emit(tool=tool, stage=stage[0], ok=False, reason=reason_of(exc),
                     trace=traceback.format_exc()[-2000:])
            finally:
                signal.alarm(0)
            emit(tool=tool, stage="done", ok=True, seconds=time.time() - start)


# ---------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------


def _preload() -> None:
    """Import everything a worker needs once, in the driver: workers are forked from it, so
    each model starts in milliseconds instead of re-importing torch, timm and transformers."""
    import timm  # noqa: F401
    import torch_pruning  # noqa: F401
    import torchvision  # noqa: F401
    import transformers  # noqa: F401

    import surgery  # noqa: F401
    import surgery.io  # noqa: F401
    from surgery.plugins import plugin_manager

    plugin_manager()
    for name in HF_CLASSES:
        getattr(transformers, name)


def _child(source: str, name: str, tools: list[str], limit: float, threads: int,
           fd: int) -> None:
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = sys.stdout
    os.environ["SWEEP_THREADS"] = str(threads)
    worker(source, name, tools, limit)
    sys.stdout.flush()


class _Job:
    """One model in a forked worker; its output goes to a temporary file."""

    def __init__(self, source: str, name: str, tools: list[str], limit: float, threads: int):
        import multiprocessing

        self.source, self.name, self.start = source, name, time.time()
        self.out = tempfile.TemporaryFile(mode="w+")
        ctx = multiprocessing.get_context("fork")
        self.proc = ctx.Process(target=_child, daemon=True,
                                args=(source, name, tools, limit, threads, self.out.fileno()))
        self.proc.start()

    def done(self) -> bool:
        return not self.proc.is_alive()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()

    def text(self) -> str:
        self.proc.join()
        self.out.seek(0)
        text = self.out.read()
        self.out.close()
        return text


def _parse(source: str, name: str, text: str, killed: bool, seconds: float, tools) -> dict:
    result: dict[str, Any] = {"source": source, "name": name, "seconds": seconds,
                              "setup": None, **{t: {"stages": {}, "info": {}} for t in tools}}
    for line in text.splitlines():
        if not line.startswith(MARK):
            continue
        rec = json.loads(line[len(MARK):])
        if rec["tool"] == "setup":
            result["setup"] = rec
            continue
        entry = result[rec["tool"]]
        if rec["stage"] == "done":
            entry["seconds"] = rec["seconds"]
            continue
        entry["stages"][rec["stage"]] = rec["ok"]
        if not rec["ok"]:
            entry["reason"] = rec["reason"]
            entry["trace"] = rec.get("trace", "")
        entry["info"].update({k: v for k, v in rec.items()
                              if k not in ("tool", "stage", "ok", "reason", "trace")})
    tail = "\n".join(l for l in text.splitlines() if not l.startswith(MARK))[-600:]
    if result["setup"] is None or not result["setup"]["ok"]:
        reason = (result["setup"] or {}).get("reason") or (
            "Timeout: killed" if killed else f"worker died: {tail.strip().splitlines()[-1:]}")
        result["setup"] = {"ok": False, "reason": reason}
        for t in tools:
            result[t]["reason"] = f"setup: {reason}"
        return result
    for t in tools:
        entry = result[t]
        if "reason" not in entry and len(entry["stages"]) < len(STAGES):
            missing = next(s for s in STAGES if s not in entry["stages"])
            entry["stages"][missing] = False
            last = tail.strip().splitlines()[-1:] or [""]
            entry["reason"] = ("Timeout: worker killed" if killed
                               else f"worker died in {missing}: {last[0][:200]}")
    return result


def sweep(items: list[tuple[str, str]], tools: list[str], limit: float, jobs: int,
          threads: int, verbose: bool, checkpoint: Path | None = None,
          done: list[dict] | None = None) -> list[dict]:
    """Run every item not in ``done``; each result is appended to ``checkpoint`` (JSON lines)
    as it comes, so an interrupted sweep resumes with ``--resume``."""
    _preload()
    results = list(done or [])
    finished = {(r["source"], r["name"]) for r in results}
    pending = [i for i in items if i not in finished]
    running: list[_Job] = []
    hard = limit * len(tools) + 180  # both tools' limits plus building the model
    while pending or running:
        while pending and len(running) < jobs:
            running.append(_Job(*pending.pop(0), tools, limit, threads))
        time.sleep(0.1)
        for job in list(running):
            elapsed = time.time() - job.start
            killed = False
            if not job.done():
                if elapsed < hard:
                    continue
                job.kill()
                killed = True
            running.remove(job)
            res = _parse(job.source, job.name, job.text(), killed, elapsed, tools)
            results.append(res)
            if checkpoint is not None:
                with open(checkpoint, "a") as f:
                    f.write(json.dumps(res) + "\n")
            line = f"[{len(results):3d}/{len(items)}] {job.source:11s} {job.name:40s} {elapsed:6.1f}s"
            for t in tools:
                ok = _passed(res, t)
                line += f"  {t}: {'ok' if ok else 'FAIL ' + res[t].get('reason', '')[:90]}"
            print(line, flush=True)
            if verbose and not all(_passed(res, t) for t in tools):
                for t in tools:
                    if res[t].get("trace"):
                        print(res[t]["trace"], flush=True)
    order = {item: i for i, item in enumerate(items)}
    results = [r for r in results if (r["source"], r["name"]) in order]
    results.sort(key=lambda r: order[(r["source"], r["name"])])
    return results


def _passed(res: dict, tool: str, stage: str = "reload") -> bool:
    if not res["setup"] or not res["setup"].get("ok"):
        return False
    upto = STAGES[: STAGES.index(stage) + 1]
    return all(res[tool]["stages"].get(s) is True for s in upto)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _pct(n: int, d: int) -> str:
    return f"{n}/{d} ({100 * n / d:.1f}%)" if d else "0/0"


def report(results: list[dict], tools: list[str], seconds: float, args) -> str:
    from _common import machine, markdown_table

    names = {"surgery": "surgery", "tp": "Torch-Pruning 1.6"}
    sources = [s for s in ("torchvision", "timm", "hf") if any(r["source"] == s for r in results)]
    rows = []
    for tool in tools:
        for src in sources + ["all"]:
            subset = [r for r in results if src == "all" or r["source"] == src]
            row = {"tool": names[tool], "models": f"**{src}**" if src == "all" else src}
            for stage in STAGES:
                row[stage] = _pct(sum(_passed(r, tool, stage) for r in subset), len(subset))
            rows.append(row)
    summary = markdown_table(rows, ["tool", "models", *STAGES])

    def macs(r: dict, tool: str) -> str:
        v = r[tool]["info"].get("macs_removed")
        return f"{100 * v:.0f}%" if v is not None else ""

    detail = []
    for r in results:
        row = {"source": r["source"], "model": f"`{r['name']}`",
               "input": _fmt_input((r["setup"] or {}).get("input")),
               "params": _fmt_count((r["setup"] or {}).get("params"))}
        for t in tools:
            row[names[t]] = ("ok" if _passed(r, t) else
                             f"fails at {_failed_stage(r, t)}") + (
                f" ({macs(r, t)} MACs)" if macs(r, t) else "")
        row["time"] = f"{r['seconds']:.0f} s"
        detail.append(row)
    failures = []
    for t in tools:
        bad = [r for r in results if not _passed(r, t)]
        failures.append(f"### {names[t]}: {len(bad)} failure(s)\n")
        if not bad:
            failures.append("None.\n")
        for r in bad:
            failures.append(f"- `{r['name']}` ({r['source']}), {_failed_stage(r, t)}: "
                            f"{_md(r[t].get('reason', '?'))}")
        failures.append("")
    timm_note = ""
    if "timm" in sources:
        timm_note = (" timm: per defining module (family), the model with the fewest "
                     "parameters, counted on the meta device.")
    total = len(results)
    body = f"""Every model: random init, eval mode, batch 1; the smallest input the model takes
(64x64 where it allows, else its minimum or fixed size; text: 16 tokens).{timm_note}
Hugging Face encoders: 2 layers, hidden 64, 4 heads (ViT/DeiT: 32x32 images, patch 8).

- **surgery**: `trace` = `surgery.couple(model, x)`; `prune` =
  `surgery.prune(model, x, sparsity={SPARSITY}, budget="macs", criterion="magnitude")`;
  `run` = the pruned model runs with the dense output shapes; `reload` = `surgery.io.save` +
  `surgery.io.load` (rebuilds the base architecture, slices it by the plan, loads safetensors)
  give the same outputs (rtol 1e-4, atol 1e-5).
- **Torch-Pruning {_tp_version()}**: `trace` = `tp.pruner.MetaPruner(model, x,
  GroupMagnitudeImportance(p=2), pruning_ratio={TP_RATIO}, ignored_layers=[layers writing the
  class logits], num_heads=...)` (heads declared and fixed up after the step as in its timm
  and BERT examples); `prune` = `pruner.step()`; `run` as above; `reload` = its own
  serialization: `tp.save(tp.state_dict(model))`, then `tp.load(path, weights_only=False)`
  (torch's default `weights_only=True` refuses its pickles) and `tp.load_state_dict` onto a
  fresh unpruned model. A fixed channel ratio of {TP_RATIO} per layer removes about 30% of a
  conv net's MACs ((1 - {TP_RATIO})^2 = {(1 - TP_RATIO) ** 2:.2f}); the MACs each tool removed
  are in the per-model table.

Each stage counts only if the earlier ones passed. Each model runs in its own (forked) process,
{args.jobs} at a time with {args.threads} torch thread(s) each; each tool has {args.timeout:.0f} s.

Command: `python benchmarks/model_sweep.py{_cmd_args(args)}`
Machine: {machine()}. Whole sweep ({total} models, {" and ".join(names[t] for t in tools)}): {seconds / 60:.1f} min{" (resumed from its checkpoint: models missing from it, or removed to rerun them after a fix, were run again; the time is the sum of the parts)" if getattr(args, "resumed", False) else ""}.

## Success rates

{summary}

## Failures

{chr(10).join(failures)}
## Per model

{markdown_table(detail, ["source", "model", "input", "params", *[names[t] for t in tools], "time"])}
"""
    return body


def _tp_version() -> str:
    try:
        import torch_pruning as tp

        return tp.__version__
    except Exception:
        return "?"


def _cmd_args(args) -> str:
    out = ""
    if args.only:
        out += f" --only {args.only}"
    if args.limit:
        out += f" --limit {args.limit}"
    return out


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _fmt_input(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return ", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in value.items()
                         if k != "attention_mask")
    return "x".join(map(str, value[2:]))


def _fmt_count(n: Any) -> str:
    if not n:
        return ""
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _failed_stage(r: dict, tool: str) -> str:
    if not r["setup"] or not r["setup"].get("ok"):
        return "setup"
    return next((s for s in STAGES if r[tool]["stages"].get(s) is not True), "?")


def _source_of(name: str) -> tuple[str, str]:
    if name in HF_CLASSES:
        return "hf", name
    if name in torchvision_models():
        return "torchvision", name
    return "timm", name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("torchvision", "timm", "hf"))
    p.add_argument("--limit", type=int, help="first N models of the list")
    p.add_argument("--models", help="comma-separated model names (any source)")
    p.add_argument("--tools", default="surgery,tp")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per model and tool")
    p.add_argument("--jobs", type=int, default=2, help="models at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per model")
    p.add_argument("--refresh-timm", action="store_true", help="recount timm model sizes")
    p.add_argument("--no-write", action="store_true", help="do not write the doc")
    p.add_argument("--json", help="also dump the raw results here")
    p.add_argument("--checkpoint", default=str(ROOT / "benchmarks" / ".cache" / "model_sweep.jsonl"),
                   help="results so far, one JSON line per model")
    p.add_argument("--resume", action="store_true",
                   help="skip the models already in --checkpoint (an interrupted sweep)")
    p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--worker", nargs=2, metavar=("SOURCE", "NAME"), help=argparse.SUPPRESS)
    args = p.parse_args()
    tools = [t for t in args.tools.split(",") if t]
    if args.worker:
        worker(*args.worker, tools, args.timeout)
        return
    start = time.time()
    if args.models:
        items = [_source_of(n) for n in args.models.split(",")]
    else:
        items = entries(args.only, args.refresh_timm)
    if args.limit:
        items = items[: args.limit]
    print(f"{len(items)} models, tools {tools}, listed in {time.time() - start:.0f} s", flush=True)
    checkpoint = Path(args.checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    done, before = [], 0.0
    if args.resume and checkpoint.is_file():
        for line in checkpoint.read_text().splitlines():
            rec = json.loads(line)
            if "driver_seconds" in rec:
                before = rec["driver_seconds"]
            else:
                done.append(rec)
        print(f"resuming: {len(done)} models done in {before / 60:.1f} min", flush=True)
    else:
        checkpoint.write_text("")
    try:
        results = sweep(items, tools, args.timeout, args.jobs, args.threads, args.verbose,
                        checkpoint, done)
    finally:
        with open(checkpoint, "a") as f:
            f.write(json.dumps({"driver_seconds": before + time.time() - start}) + "\n")
    seconds = before + time.time() - start
    args.resumed = bool(done)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    body = report(results, tools, seconds, args)
    full = not (args.only or args.limit or args.models) and tools == list(TOOLS)
    if full and not args.no_write:
        from _common import write_result

        write_result("model_sweep", "Model sweep: surgery vs Torch-Pruning", body)
    else:
        print(body)


if __name__ == "__main__":
    main()
