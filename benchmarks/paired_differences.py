"""Paired accuracy differences between `mi` and each other criterion of ours (Fashion-MNIST).

Every method is scored on the same test images, so the difference of two accuracies has a much
smaller standard error than either accuracy: the standard deviation of the per-image
difference of correctness over sqrt(n). Two criteria within 0.2 points of each other (the
side-by-side pages' resolution, standard error 0.004-0.009) can be told apart, or not, here.
Writes docs/benchmarks/paired_<model>.md.
"""

from __future__ import annotations

import argparse
import math
import time

import mi_vs_baselines as side_by_side
import torch
from _common import machine, markdown_table, write_result

REFERENCE = "ours: mi (joint)"


def correct(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> torch.Tensor:
    """1.0 where the model's top class is the label, per test image."""
    with torch.inference_mode():
        return torch.cat([model.eval()(x).argmax(-1) == y for x, y in batches]).double()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("cnn", "vit"), default="vit")
    parser.add_argument("--sizes", default="0.3,0.5,0.75")
    parser.add_argument("--test-images", type=int, default=0,
                        help="Fashion-MNIST test images (0: all 10,000)")
    args = parser.parse_args()
    if args.test_images < 0:
        parser.error(f"--test-images {args.test_images}: give a count of images, or 0 for all")
    torch.set_num_threads(2)
    side_by_side.TEST_IMAGES = args.test_images
    task = side_by_side.TASKS[args.model]()
    names = [n for n in side_by_side.METHODS if n.startswith("ours") and "kinds alike" not in n]
    rows = []
    for size in (float(s) for s in args.sizes.split(",")):
        start = time.perf_counter()
        got = {n: correct(side_by_side.METHODS[n](task, size), task.test) for n in names}
        reference = got[REFERENCE]
        for name in names:
            if name == REFERENCE:
                continue
            diff = reference - got[name]
            se = diff.std().item() / math.sqrt(len(diff))
            rows.append({"removed": f"{size:.0%}", "method": name,
                         "accuracy": f"{got[name].mean():.4f}",
                         "mi": f"{reference.mean():.4f}",
                         "mi minus it": f"{diff.mean():+.4f} ± {se:.4f}",
                         "in paired SEs": f"{diff.mean().item() / se:+.1f}" if se else "-"})
            print(rows[-1], flush=True)
        print(f"[{size:.0%} in {time.perf_counter() - start:.0f} s]", flush=True)
    write_result(
        f"paired_{args.model}", f"Paired differences: {task.title}",
        f"`mi` against each other criterion of ours on the same {task.test_size:,} test images, no "
        "retraining, the side-by-side's settings (mi_vs_baselines.py). 'mi minus it': the mean "
        "per-image difference of correctness ± its standard error (paired: the standard "
        "deviation of the differences over sqrt(n)); 'in paired SEs' is their ratio, so "
        "|values| under 2 are not a measurable difference.\n"
        f"Machine: {machine()}.\n\n"
        + markdown_table(rows, ["removed", "method", "accuracy", "mi", "mi minus it",
                                "in paired SEs"])
        + f"\n\nReproduce: `python benchmarks/paired_differences.py --model {args.model} "
        f"--sizes {args.sizes} --test-images {args.test_images}`.")

if __name__ == "__main__":
    main()
