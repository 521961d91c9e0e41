"""Per-layer Hessian traces: PyHessian vs mpq's Hutchinson vs mpq's default, in one run.

    pip install pyhessian            # only for this benchmark
    python benchmarks/sensitivity.py --checkpoint checkpoints/resnet20_cifar10.pt \
        --data-root ~/.cache/mpq/cifar10-jpeg [--layers conv1 fc] [--rel-tol 0.05]

Same model, same batch (the first 128 training images, no augmentation), BN in eval mode:
- PyHessian, restricted to one layer (only that weight requires grad), its own Hessian-vector
  product, with Rademacher probes until the standard error is `rel-tol` of the mean (and at
  least 30 probes, as mpq's default);
- mpq's Hutchinson (`estimator="hutchinson"`) at the same tolerance and minimum, top
  eigenvalue off: the top 8 sketched directions of each block counted exactly, the rest
  sampled (Hutch++-style deflation; its `n` counts every Hessian-vector product);
- mpq's default estimator (exact Gauss-Newton for ResNet20: all layers in one call).
Prints per-layer traces, times, ratios, and the disagreement of the default with PyHessian in
units of standard error: the one PyHessian reports (estimated from its own probes, which stop
as soon as it looks small enough, so it runs low) and the true one, known here because the
block H is known exactly: a Rademacher probe's v^T H v has variance 2 (||H||_F^2 - sum_j H_jj^2),
so n probes have standard error sqrt(that / n). Under a correct default those true z-scores are
about standard normal, and of 22 layers about one lies beyond 2 (each does with probability
4.6%; all 22 within 2 happens 36% of the time), so the count is printed beside its expectation.
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
from mpq.hessian.hutchinson import gauss_newton_rows  # noqa: E402
from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.quant import quantizable_layers  # noqa: E402


def pyhessian_trace(model, name, x, y, rel_tol, min_probes=30, max_probes=500, seed=0):
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


def probe_std(model, name, x) -> float:
    """Standard deviation of one Rademacher probe v^T H v of the layer's exact block
    H = R^T R / N (R: the per-sample, per-class gradient rows of the Gauss-Newton form)."""
    weight = model.get_submodule(name).weight
    with torch.no_grad():
        rows = gauss_newton_rows(model, f"{name}.weight", weight.detach(), x)
        rows = rows.reshape(-1, rows.shape[-1]).double() / math.sqrt(len(x))   # H = R^T R
        frob2 = (rows @ rows.T).pow(2).sum().item()                           # ||H||_F^2
        diag2 = rows.pow(2).sum(0).pow(2).sum().item()                        # sum H_jj^2
    return math.sqrt(2 * max(frob2 - diag2, 0.0))


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

    # The default twice: the first call in a process pays one-time costs (oneDNN kernels for
    # each layer's shapes, the allocator's first large buffers); both times are printed.
    start = time.perf_counter()
    default = layer_sensitivity(model, [(x, y)], layers=layers)
    t_cold = time.perf_counter() - start
    start = time.perf_counter()
    layer_sensitivity(model, [(x, y)], layers=layers)
    t_default = time.perf_counter() - start
    rows, t_pyh, t_mpq = [], 0.0, 0.0
    for name in layers:
        p_mean, p_se, p_n, p_sec = pyhessian_trace(model, name, x, y, args.rel_tol)
        start = time.perf_counter()
        h = layer_sensitivity(model, [(x, y)], layers=[name], estimator="hutchinson",
                              rel_tol=args.rel_tol, top_eigenvalue=False)[name]
        m_sec = time.perf_counter() - start
        t_pyh, t_mpq = t_pyh + p_sec, t_mpq + m_sec
        d = default[name]
        off = abs(d.trace - p_mean) / p_se
        std = probe_std(model, name, x)
        true_off = abs(d.trace - p_mean) / (std / math.sqrt(p_n))
        mpq_off = abs(d.trace - h.trace) / h.trace_se
        rows.append((name, p_mean, p_se, p_n, p_sec, h.trace, h.trace_se, h.probes, m_sec,
                     d.trace, d.estimator, off, true_off, mpq_off))
    print(f"ResNet20, batch {args.batch}, {args.threads} threads, relative SE target "
          f"{args.rel_tol}, torch {torch.__version__}")
    print(f"{'layer':22s} {'PyHessian':>18s} {'n':>4s} {'s':>6s} {'mpq hutchinson':>18s} "
          f"{'n':>4s} {'s':>6s} {'mpq default':>12s} {'z rep':>6s} {'z true':>6s} {'z mpq':>6s}")
    for r in rows:
        print(f"{r[0]:22s} {r[1]:10.3f}+-{r[2]:6.3f} {r[3]:4d} {r[4]:6.1f} "
              f"{r[5]:10.3f}+-{r[6]:6.3f} {r[7]:4d} {r[8]:6.1f} {r[9]:12.3f} {r[11]:6.2f} "
              f"{r[12]:6.2f} {r[13]:6.2f}")
    print("z rep: |default - PyHessian| / PyHessian's reported SE; z true: the same over the "
          "true SE of its probes; z mpq: mpq Hutchinson against the default, in mpq's SE")
    print(f"total seconds: PyHessian {t_pyh:.1f}, mpq hutchinson {t_mpq:.1f}, "
          f"mpq default ({default[layers[0]].estimator}) {t_default:.1f} "
          f"(first call in the process {t_cold:.1f})")
    print(f"ratios: default is {t_pyh / t_default:.1f}x faster than PyHessian "
          f"({t_pyh / t_cold:.1f}x on its first call); "
          f"mpq hutchinson takes {t_mpq / t_pyh:.2f}x PyHessian's time")
    expected = len(rows) * math.erfc(2 / math.sqrt(2))
    for label, col in (("reported", 11), ("true", 12)):
        beyond = sum(r[col] > 2 for r in rows)
        print(f"default vs PyHessian, {label} SE: largest {max(r[col] for r in rows):.2f} SE, "
              f"{beyond} of {len(rows)} layers beyond 2 SE (expected by chance {expected:.1f})")
    beyond = sum(r[13] > 2 for r in rows)
    print(f"default vs mpq hutchinson, its SE: largest {max(r[13] for r in rows):.2f} SE, "
          f"{beyond} of {len(rows)} beyond 2 SE")


if __name__ == "__main__":
    main()
