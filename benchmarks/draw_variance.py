"""How noisy one sampled-sensitivity draw is, with labels against with random signs, side by side.

    python benchmarks/draw_variance.py [--model resnet50] [--classes 1000] [--images 8]
                                       [--draws 4] [--threads 2]

On a randomly initialised torchvision model (or `smooth`, see scale.py) and synthetic images at
its size: `mpq.hessian.ggn.sampled_ggn` with a fixed number of draws per kind, no eigenvalues.
Prints the mean top predicted probability (how confident the model is), each kind's time, and
per layer the relative standard deviation of one draw on one image (relative SE x sqrt(draws)):
its worst, its median, and the draws 5% relative SE would need at these images.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from mpq.hessian.ggn import sampled_ggn  # noqa: E402
from mpq.quant import quantizable_layers  # noqa: E402
from scale import build  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, size, _ = build(args.model, args.classes)
    model.eval()
    layers = quantizable_layers(model)
    x = torch.randn(args.images, 3, size, size, generator=torch.Generator().manual_seed(0))
    batches = [(x, torch.zeros(args.images, dtype=torch.long))]
    with torch.no_grad():
        confidence = torch.softmax(model(x).double(), 1).max(1).values.mean().item()
    print(f"{args.model}, {args.classes} classes, {args.images} images at {size} px, "
          f"{args.draws} draws, {args.threads} threads, torch {torch.__version__}; mean top "
          f"probability {confidence:.3f}")
    print(f"{'draws':8s} {'seconds':>8s} {'worst SD/draw':>14s} {'median':>8s} "
          f"{'draws for 5%':>13s}")
    for draw in ("labels", "signs"):
        start = time.perf_counter()
        found = sampled_ggn(model, layers, batches, memory_bytes=2 << 30, rel_tol=1e-9,
                            min_draws=args.draws, max_draws=args.draws, top_eigenvalue=False,
                            draw=draw)
        seconds = time.perf_counter() - start
        sd = sorted(r["trace_se"] / abs(r["trace"]) * math.sqrt(args.draws)
                    for r in found.values())
        print(f"{draw:8s} {seconds:8.1f} {sd[-1]:14.2f} {sd[len(sd) // 2]:8.2f} "
              f"{math.ceil((sd[-1] / 0.05) ** 2):13d}")


if __name__ == "__main__":
    main()
