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

    python benchmarks/sensitivity.py --check-cost [--batch 128] [--resnet18-batch 16]

prints instead what the numerical check of the `exact` labels (`mpq.hessian.exactness`) costs
beside the exact path it guards (`exact_ggn` over every layer, top eigenvalues on), in CPU
seconds of the fastest of a few calls (wall in brackets: on a shared machine CPU time is the
steadier), on ResNet20 (the
checkpoint, `--batch` training images) and on torchvision's resnet18 (random weights, 10
classes so that the exact path applies, `--resnet18-batch` synthetic 224px images). Beside
them, the check's largest gap (0 on these piecewise-linear networks) and the rounding floor
that `EXACT_REL_TOL` must sit above: H v and G v computed as two separate products in float32.
No PyHessian needed.
"""

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.config import DataConfig  # noqa: E402
from mpq.data import BatchLoader, load_split  # noqa: E402
from mpq.hessian import layer_sensitivity  # noqa: E402
from mpq.hessian.exactness import (CHECK_DIRECTIONS, CHECK_IMAGES, EXACT_REL_TOL,  # noqa: E402
                                   _prepared, curvature_gaps)
from mpq.hessian.ggn import exact_ggn  # noqa: E402
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


def rounding_floor(model, layers, x, y, seed=0) -> float:
    """Largest ||H v - G v|| / ||G v|| over the layers, H v (a double backward of the loss) and
    G v (J^T H_out J v) computed as two separate products for one joint direction, on the
    check's copy of the model: its Hessian is its Gauss-Newton matrix where the network is
    piecewise linear, so what is left is float32 rounding."""
    model = _prepared(model, layers)
    weights = [model.get_submodule(name).weight for name in layers]
    gen = torch.Generator().manual_seed(seed)
    v = [torch.randn(w.shape, generator=gen) for w in weights]
    z = model(x)
    p = F.softmax(z.detach(), dim=1)
    grads = torch.autograd.grad(F.cross_entropy(z, y), weights, create_graph=True)
    hv = torch.autograd.grad(grads, weights, v, retain_graph=True)
    u = torch.zeros_like(z, requires_grad=True)
    jv = torch.autograd.grad(torch.autograd.grad(z, weights, u, create_graph=True), u, v)[0]
    gv = torch.autograd.grad(z, weights, (p * jv - p * (p * jv).sum(1, keepdim=True)) / len(x))
    return max(((h - g).norm() / g.norm()).item() for h, g in zip(hv, gv))


def _timed(fn, repeat: int):
    """(result, CPU seconds, wall seconds) of the fastest of `repeat` calls: the first pays
    one-time costs (oneDNN kernels for each shape, the allocator's first large buffers), and
    on a shared machine the others' load only ever adds time."""
    best = (math.inf, math.inf)
    for _ in range(repeat):
        cpu, wall = time.process_time(), time.perf_counter()
        out = fn()
        best = min(best, (time.process_time() - cpu, time.perf_counter() - wall))
    return out, *best


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown CPU"


def check_cost(args) -> None:
    """The exactness check's time against the exact path's, on ResNet20 and resnet18."""
    import torchvision

    teacher = load_teacher(args.checkpoint, model_name="resnet20", num_classes=10).eval()
    split = load_split(DataConfig(), "train", root=args.data_root, progress=False)
    x, y = next(BatchLoader(split, DataConfig(), batch_size=args.batch, train=False).epoch(0))
    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(0)
    x18 = torch.randn(args.resnet18_batch, 3, 224, 224, generator=gen)
    y18 = torch.randint(0, 10, (args.resnet18_batch,), generator=gen)
    print(f"exactness check ({CHECK_IMAGES} images x {CHECK_DIRECTIONS} directions, tolerance "
          f"{EXACT_REL_TOL:g}) against the exact path; {args.threads} threads, torch "
          f"{torch.__version__}, {_cpu_name()}")
    print(f"{'model':10s} {'images':>6s} {'layers':>6s} {'exact path s':>16s} "
          f"{'check s':>14s} {'ratio':>6s} {'max gap':>8s} {'rounding':>9s}")
    for label, model, xs, ys in (("ResNet20", teacher, x, y), ("resnet18", resnet18, x18, y18)):
        layers = quantizable_layers(model)
        _, exact_cpu, exact_wall = _timed(lambda: exact_ggn(model, layers, [(xs, ys)],
                                                            memory_bytes=2 << 30), repeat=2)
        gaps, check_cpu, check_wall = _timed(lambda: curvature_gaps(
            model, layers, xs[:CHECK_IMAGES], ys[:CHECK_IMAGES], directions=CHECK_DIRECTIONS),
            repeat=4)
        floor = rounding_floor(model, layers, xs[:CHECK_IMAGES], ys[:CHECK_IMAGES])
        print(f"{label:10s} {len(xs):6d} {len(layers):6d} {exact_cpu:7.1f} ({exact_wall:6.1f}) "
              f"{check_cpu:5.1f} ({check_wall:5.1f}) {check_cpu / exact_cpu:6.1%} "
              f"{max(gaps.values()):8.1e} {floor:9.1e}")
    print("seconds: CPU (wall); ratio: check / exact path in CPU time; max gap: the check's "
          "largest ||Hv - Gv|| / ||Hv||; rounding: the same for two separately computed "
          "products, the float32 floor")


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="checkpoints/resnet20_cifar10.pt")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--layers", nargs="*", help="default: every quantizable layer")
    parser.add_argument("--rel-tol", type=float, default=0.05)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--check-cost", action="store_true",
                        help="only time the exactness check against the exact path")
    parser.add_argument("--resnet18-batch", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.check_cost:
        check_cost(args)
        return
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
