"""Sampled sensitivity against the exact one on the committed ResNet20 teacher.

    python benchmarks/sampled_ggn.py --data-root ~/.cache/mpq/cifar10-jpeg [--seeds 3]
                                     [--draws signs,labels]

The search's sensitivity batches (2 x 128 training images, no augmentation, BN in eval mode):
the default (`exact` here: ResNet20 is piecewise linear and has 10 classes) against
`estimator="sampled"` (cost independent of the classes) at 5% relative standard error, for a
few seeds and each kind of draw (`signs`, the default, and `labels`). Prints per-layer traces,
z-scores (sampled - exact) / SE, how many lie beyond 2 beside how many would by chance (4.6%
each), the top eigenvalues, the draws each layer needed, and the times.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.config import load_recipe  # noqa: E402
from mpq.data import BatchLoader, load_split  # noqa: E402
from mpq.hessian import layer_sensitivity  # noqa: E402
from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.search import SearchRecipe  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints/resnet20_cifar10.pt"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes/resnet20_cifar10.yaml"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--draws", default="signs,labels", help="sampled draws to compare")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, [], cls=SearchRecipe)
    cfg = recipe.search
    model = load_teacher(args.checkpoint, model_name=recipe.model.name,
                         num_classes=recipe.model.num_classes).eval()
    train = load_split(recipe.data, "train", root=args.data_root, progress=False)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
    head = train.subset(order[:cfg.batch_size * cfg.sensitivity_batches])
    loader = BatchLoader(head, recipe.data, batch_size=cfg.batch_size, train=False)
    batches = list(loader.epoch(0))[:cfg.sensitivity_batches]

    start = time.perf_counter()
    exact = layer_sensitivity(model, batches)
    t_exact = time.perf_counter() - start
    print(f"ResNet20 teacher, {sum(len(y) for _, y in batches)} images, {args.threads} threads, "
          f"torch {torch.__version__}; default estimator: "
          f"{sorted({s.estimator for s in exact.values()})}; exact {t_exact:.1f} s")
    for draws in args.draws.split(","):
        runs, times = [], []
        for seed in range(args.seeds):
            start = time.perf_counter()
            runs.append(layer_sensitivity(model, batches, estimator="sampled", seed=seed,
                                          draws=draws))
            times.append(time.perf_counter() - start)
        print(f"\nsampled, draws={draws}")
        print(f"{'layer':20s} {'exact trace':>12s} {'sampled (seed 0)':>22s} {'z':>6s} "
              f"{'draws':>5s} {'exact top':>10s} {'sampled top':>18s}")
        zs = []
        for name, e in exact.items():
            for run in runs:
                s = run[name]
                zs.append((s.trace - e.trace) / s.trace_se)
            s = runs[0][name]
            print(f"{name:20s} {e.trace:12.4f} {s.trace:12.4f}+-{s.trace_se:8.4f} "
                  f"{(s.trace - e.trace) / s.trace_se:6.2f} {s.probes:5d} "
                  f"{e.top_eigenvalue:10.4f} {s.top_eigenvalue:10.4f}+-{s.top_eigenvalue_se:6.4f}")
        beyond = sum(abs(z) > 2 for z in zs)
        print(f"draws={draws}: z-scores of {len(zs)} (layer, seed) pairs: {beyond} beyond 2 SE "
              f"(expected by chance: {0.0455 * len(zs):.1f}), largest |z| "
              f"{max(map(abs, zs)):.2f}, mean z {sum(zs) / len(zs):+.2f}; "
              f"{sum(times) / len(times):.1f} s per seed, draws per layer "
              f"{min(s.probes for r in runs for s in r.values())}-"
              f"{max(s.probes for r in runs for s in r.values())}")

if __name__ == "__main__":
    main()
