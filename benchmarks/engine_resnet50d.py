"""Engine benchmark on timm resnet50d (random init) with 256 calibration images at 224x224.

Measures, side by side in one run:
- pruning wall time (trace, calibrate, MI scoring, plan, slice, verify) against the time of
  the calibration forward passes alone (target <= 3x);
- peak memory of pruning against a plain forward over the same batches (target <= 1.5x),
  each in a fresh process so the peak counters are clean;
- CPU latency at batch 32 of the model with 50% of MACs removed against the dense model,
  and that speedup against the MAC reduction ratio (target >= 0.8x).

Calibration images are real Fashion-MNIST pictures resized to 224x224 and repeated on three
channels. Usage: ``python benchmarks/engine_resnet50d.py [--images 256] [--batch 32]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine, markdown_table, peak_rss_mb, run_child, write_result


def images(n: int) -> torch.Tensor:
    from surgery.demo.datasets import fashion_mnist
    from surgery.errors import AssetMissing

    try:
        x, _ = fashion_mnist("test")
    except AssetMissing as exc:
        sys.exit(str(exc))
    x = x[:n].float().div(255).unsqueeze(1)
    x = F.interpolate(x, size=224, mode="bilinear", align_corners=False)
    return ((x - 0.286) / 0.353).repeat(1, 3, 1, 1)


def model() -> torch.nn.Module:
    import timm

    torch.manual_seed(0)
    return timm.create_model("resnet50d").eval()


def child(mode: str, n: int, batch: int) -> None:
    """Runs in a subprocess: either plain forwards or the whole pruning, then prints JSON."""
    import surgery

    m, x = model(), images(n)
    batches = list(x.split(batch))
    base = peak_rss_mb()
    start = time.perf_counter()
    if mode == "plain":
        with torch.no_grad():
            for b in batches:
                m(b)
    elif mode == "plan":
        surgery.make_plan(m, x[:2], batches, sparsity=0.5, budget="macs", criterion="mi")
    else:
        surgery.prune(m, x[:2], batches, sparsity=0.5, budget="macs", criterion="mi")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_mb": peak_rss_mb(), "base_mb": base}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child", choices=["plain", "plan", "prune"])
    args = parser.parse_args()
    if args.child:
        child(args.child, args.images, args.batch)
        return

    import surgery

    script = str(Path(__file__).resolve())
    common = ("--images", str(args.images), "--batch", str(args.batch))
    plain = run_child(script, "--child", "plain", *common)
    planning = run_child(script, "--child", "plan", *common)
    pruning = run_child(script, "--child", "prune", *common)

    m = model()
    x = images(args.batch)
    calib = list(images(args.images).split(args.batch))
    pruned, plan = surgery.prune(m, x[:2], calib, sparsity=0.5, budget="macs")
    dense_macs, pruned_macs = surgery.count_macs(m, x[:1]), surgery.count_macs(pruned, x[:1])
    dense_lat = surgery.measure_latency(m, x, repeats=5)
    pruned_lat = surgery.measure_latency(pruned, x, repeats=5)
    # Repeat the dense timing after the pruned one so drift on a shared machine shows up.
    dense_lat = min(dense_lat, surgery.measure_latency(m, x, repeats=5))
    mac_ratio = dense_macs / pruned_macs
    speedup = dense_lat / pruned_lat
    time_ratio = pruning["seconds"] / plain["seconds"]
    mem_ratio = pruning["peak_mb"] / plain["peak_mb"]
    rows = [
        {"measure": "plan time (trace, calibrate, MI scoring) / calibration forwards",
         "value": f"{planning['seconds']:.1f} s / {plain['seconds']:.1f} s = "
                  f"{planning['seconds'] / plain['seconds']:.2f}x",
         "target": "<= 3x", "met": "yes" if planning["seconds"] <= 3 * plain["seconds"] else "NO"},
        {"measure": "plan peak memory / plain forward",
         "value": f"{planning['peak_mb']:.0f} MiB / {plain['peak_mb']:.0f} MiB = "
                  f"{planning['peak_mb'] / plain['peak_mb']:.2f}x",
         "target": "<= 1.5x", "met": "yes" if planning["peak_mb"] <= 1.5 * plain["peak_mb"] else "NO"},
        {"measure": "full prune time (+ compensation, slicing, verification, BatchNorm "
                    "re-estimation pass) / calibration forwards",
         "value": f"{pruning['seconds']:.1f} s / {plain['seconds']:.1f} s = {time_ratio:.2f}x",
         "target": "<= 3x", "met": "yes" if time_ratio <= 3 else "NO"},
        {"measure": "full prune peak memory / plain forward",
         "value": f"{pruning['peak_mb']:.0f} MiB / {plain['peak_mb']:.0f} MiB = {mem_ratio:.2f}x",
         "target": "<= 1.5x", "met": "yes" if mem_ratio <= 1.5 else "NO"},
        {"measure": "MACs per image, dense -> pruned",
         "value": f"{dense_macs / 1e9:.2f} G -> {pruned_macs / 1e9:.2f} G ({mac_ratio:.2f}x fewer)",
         "target": "50% removed", "met": f"{1 - pruned_macs / dense_macs:.1%} removed"},
        {"measure": "params, dense -> pruned",
         "value": f"{surgery.count_params(m) / 1e6:.2f} M -> {surgery.count_params(pruned) / 1e6:.2f} M",
         "target": "", "met": ""},
        {"measure": f"CPU latency, batch {args.batch}",
         "value": f"{dense_lat * 1e3:.0f} ms -> {pruned_lat * 1e3:.0f} ms ({speedup:.2f}x faster)",
         "target": f">= 0.8 x {mac_ratio:.2f} = {0.8 * mac_ratio:.2f}x",
         "met": f"{speedup / mac_ratio:.2f} of MAC ratio: " + ("yes" if speedup >= 0.8 * mac_ratio else "NO")},
    ]
    body = (
        f"timm `resnet50d` (random init), {args.images} real Fashion-MNIST images at 224x224 "
        f"(batches of {args.batch}), criterion `mi` (Gaussian, target = model output), 50% of "
        f"MACs removed, uniform allocation.\nMachine: {machine()}.\n\n"
        + markdown_table(rows, ["measure", "value", "target", "met"])
        + f"\n\nPeak memory is the process's peak RSS (weights, libraries and activations "
        f"included): {plain['base_mb']:.0f} MiB before the first forward in both processes.\n"
        f"Reproduce: `python benchmarks/engine_resnet50d.py --images {args.images} "
        f"--batch {args.batch}`.\n"
    )
    write_result("engine_resnet50d", "Engine benchmark: resnet50d", body)


if __name__ == "__main__":
    main()
