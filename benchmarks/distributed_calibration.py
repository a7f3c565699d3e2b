"""Distributed calibration: 2 processes (gloo) against 1 on the same data.

Measures, in one run: wall time of calibration (statistics only) in 1 process with 2 threads
and in 2 processes with 1 thread each (this machine has 2 cores), the memory the statistics
take, and the bytes each all-reduce moves; then the same statistics' size for BERT-base
(hidden 768, 12 layers, 12 heads, FFN 3072), which is what one all-reduce moves per rank.

Usage: ``python benchmarks/distributed_calibration.py [--images 512] [--batch 64]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine, markdown_table, write_result


def setup(images: int, batch: int):
    import torchvision

    from surgery.demo.datasets import fashion_mnist
    from surgery.errors import AssetMissing

    try:
        x, y = fashion_mnist("test")
    except AssetMissing as exc:
        sys.exit(str(exc))
    x = F.pad(x[:images].float().div(255).unsqueeze(1), (2, 2, 2, 2)).repeat(1, 3, 1, 1)
    x = F.interpolate(x, size=96)
    torch.manual_seed(0)
    model = torchvision.models.resnet50(num_classes=10).eval()
    return model, [(x[i:i + batch], y[i:i + batch]) for i in range(0, images, batch)]


def worker(images: int, batch: int) -> None:
    """One rank (or the single process): calibrate only, print timings as JSON on rank 0."""
    import surgery
    from surgery.stats import distributed
    from surgery.stats.calibration import calibrate

    distributed.init_from_env()
    model, batches = setup(images, batch)
    coupling = surgery.couple(model, batches[0][0][:2])
    start = time.perf_counter()
    cal = calibrate(coupling, batches, target="labels")
    seconds = time.perf_counter() - start
    if distributed.rank() == 0:
        print(json.dumps({
            "seconds": seconds, "world": distributed.world_size(), "batches": cal.batches,
            "stats_bytes": distributed.payload_bytes(cal.sums), "relations": len(cal.sums),
        }))


def bert_base_payload() -> str:
    """Bytes of BERT-base's statistics (= one all-reduce), or why it cannot be measured."""
    try:
        from transformers import BertConfig, BertForSequenceClassification

        import surgery
        from surgery.stats import distributed
        from surgery.stats.calibration import calibrate

        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(num_labels=2)).eval()
        ids = torch.randint(0, 30000, (4, 64))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        coupling = surgery.couple(model, batch)
        cal = calibrate(coupling, [batch])
        return (f"{distributed.payload_bytes(cal.sums) / 2**20:.0f} MiB in one all-reduce "
                f"({len(cal.sums)} relations, {len(coupling.prunable)} prunable groups)")
    except Exception as exc:  # report, do not hide
        return f"not measured: {type(exc).__name__}: {str(exc)[:200]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--worker", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.images, args.batch)
        return
    script = str(Path(__file__).resolve())
    common = ["--worker", "--images", str(args.images), "--batch", str(args.batch)]

    def run(cmd: list[str], threads: int) -> dict:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.strip().splitlines()[-1])

    single = run([sys.executable, script, *common], threads=2)
    double = run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", script, *common], threads=1)
    rows = [
        {"setup": "1 process, 2 threads", "calibration s": f"{single['seconds']:.1f}",
         "batches per rank": single["batches"],
         "statistics MiB": f"{single['stats_bytes'] / 2**20:.1f}", "all-reduce MiB": "-"},
        {"setup": "2 processes (gloo), 1 thread each", "calibration s": f"{double['seconds']:.1f}",
         "batches per rank": f"{double['batches'] // 2} (of {double['batches']})",
         "statistics MiB": f"{double['stats_bytes'] / 2**20:.1f} per rank",
         "all-reduce MiB": f"{double['stats_bytes'] / 2**20:.1f}"},
    ]
    body = (
        f"torchvision `resnet50` (10 classes, random init) on {args.images} real Fashion-MNIST "
        f"images at 96x96, batches of {args.batch}, target = labels; calibration only "
        f"(statistics for {single['relations']} relations).\nMachine: {machine()}.\n\n"
        + markdown_table(rows, ["setup", "calibration s", "batches per rank", "statistics MiB",
                                "all-reduce MiB"])
        + f"\n\nSpeedup with 2 processes: {single['seconds'] / double['seconds']:.2f}x "
        "(the two processes share the same 2 cores as the single one; on separate machines "
        "each rank's time is its share of the batches plus one all-reduce).\n\n"
        "What scales how: statistics memory per relation is (d_x + d_t)^2 float64 values "
        "(d_x: channels of the group as its reader sees them, d_t: channels of what the "
        "reader writes), independent of the data size and of the number of ranks; each rank "
        "holds one copy. Communication is one all-reduce of all sums, the same bytes as the "
        "statistics, once per calibration, independent of the number of batches.\n\n"
        f"BERT-base (hidden 768, 12 layers, FFN 3072, 2 labels): {bert_base_payload()}.\n\n"
        f"Reproduce: `python benchmarks/distributed_calibration.py --images {args.images} "
        f"--batch {args.batch}`.\n"
    )
    write_result("distributed_calibration", "Distributed calibration", body)


if __name__ == "__main__":
    main()
