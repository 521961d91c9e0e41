"""Per-layer Hessian traces: PyHessian vs mpq's Hutchinson vs mpq's default, in one run.

    pip install pyhessian            # only for this benchmark
    python benchmarks/sensitivity.py --checkpoint checkpoints/resnet20_cifar10.pt \
        --data-root ~/.cache/mpq/cifar10-jpeg [--layers conv1 fc] [--rel-tol 0.05]

Same model, same batch (the first 128 training images, no augmentation), BN in eval mode:
- PyHessian, restricted to one layer (only that weight requires grad), its own Hessian-vector
  product, with Rademacher probes until the standard error is `rel-tol` of the mean;
- mpq's Hutchinson (`estimator="hutchinson"`) at the same tolerance, top eigenvalue off;
- mpq's default estimator (exact Gauss-Newton for ResNet20: all layers in one call).
Prints per-layer traces, times, ratios, and the largest disagreement of the default with
PyHessian in units of PyHessian's standard error.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.config import DataConfig  # noqa: E402
from mpq.data import BatchLoader, load_split  # noqa: E402
from mpq.hessian import layer_sensitivity  # noqa: E402
from mpq.qat import load_teacher  # noqa: E402
from mpq.quant import quantizable_layers  # noqa: E402


def pyhessian_trace(model, name, x, y, rel_tol, min_probes=8, max_probes=500, seed=0):
    from pyhessian import hessian
    from pyhessian.utils import group_product, hessian_vector_product

    for p in model.parameters():
        p.requires_grad_(False)
    model.get_submodule(name).weight.requires_grad_(True)
    model.zero_grad()
    torch.manual_seed(seed)
    start = time.perf_counter()
    h = hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    samples = []
    while len(samples) < max_probes:
        v = [torch.randint_like(p, high=2) * 2 - 1 for p in h.params]
        samples.append(group_product(hessian_vector_product(h.gradsH, h.params, v), v).item())
        n = len(samples)
        if n >= min_probes:
            mean = sum(samples) / n
            se = math.sqrt(sum((s - mean) ** 2 for s in samples) / (n - 1) / n)
            if se <= rel_tol * abs(mean):
                break
    seconds = time.perf_counter() - start
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = None
    return mean, se, n, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/resnet20_cifar10.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--layers", nargs="*", help="default: every quantizable layer")
    parser.add_argument("--rel-tol", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_teacher(args.checkpoint, model_name="resnet20", num_classes=10).eval()
    split = load_split(DataConfig(), "train", root=args.data_root, progress=False)
    x, y = next(BatchLoader(split, DataConfig(), batch_size=args.batch, train=False).epoch(0))
    layers = args.layers or quantizable_layers(model)

    start = time.perf_counter()
    default = layer_sensitivity(model, [(x, y)], layers=layers)
    t_default = time.perf_counter() - start
    rows, t_pyh, t_mpq, worst = [], 0.0, 0.0, 0.0
    for name in layers:
        p_mean, p_se, p_n, p_sec = pyhessian_trace(model, name, x, y, args.rel_tol)
        start = time.perf_counter()
        h = layer_sensitivity(model, [(x, y)], layers=[name], estimator="hutchinson",
                              rel_tol=args.rel_tol, top_eigenvalue=False)[name]
        m_sec = time.perf_counter() - start
        t_pyh, t_mpq = t_pyh + p_sec, t_mpq + m_sec
        d = default[name]
        off = abs(d.trace - p_mean) / p_se
        worst = max(worst, off)
        rows.append((name, p_mean, p_se, p_n, p_sec, h.trace, h.trace_se, h.probes, m_sec,
                     d.trace, d.estimator, off))
    print(f"ResNet20, batch {args.batch}, {args.threads} threads, relative SE target "
          f"{args.rel_tol}, torch {torch.__version__}")
    print(f"{'layer':22s} {'PyHessian':>18s} {'n':>4s} {'s':>6s} {'mpq hutchinson':>18s} "
          f"{'n':>4s} {'s':>6s} {'mpq default':>12s} {'|d-p|/se':>8s}")
    for r in rows:
        print(f"{r[0]:22s} {r[1]:10.3f}+-{r[2]:6.3f} {r[3]:4d} {r[4]:6.1f} "
              f"{r[5]:10.3f}+-{r[6]:6.3f} {r[7]:4d} {r[8]:6.1f} {r[9]:12.3f} {r[11]:8.2f}")
    print(f"total seconds: PyHessian {t_pyh:.1f}, mpq hutchinson {t_mpq:.1f}, "
          f"mpq default ({default[layers[0]].estimator}) {t_default:.1f}")
    print(f"ratios: default is {t_pyh / t_default:.1f}x faster than PyHessian; "
          f"mpq hutchinson takes {t_mpq / t_pyh:.2f}x PyHessian's time")
    print(f"largest disagreement of the default with PyHessian: {worst:.2f} standard errors")


if __name__ == "__main__":
    main()
