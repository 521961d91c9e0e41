"""What re-estimating BN's statistics buys a QAT run, its weights' moving average, and what
a refresh of the clipping ratios costs.

    python benchmarks/average_bn.py RUN [RUN ...] --data-root ~/.cache/mpq/cifar10-jpeg
        [--bn-batches 200] [--threads 2] [--refresh]

Each RUN is a QAT run folder (its `checkpoint_last.pt`) or a copy of such a checkpoint taken
mid-schedule (a `.pt` file). For the live weights, and for their average where the run was
trained with `train.ema_epochs`, this prints the test top-1 as trained and after re-estimating
BN (`mpq.quant.reestimate_bn_`, what `qat.bn_reestimate_batches` does) on `--bn-batches`
augmented training batches. Averaging BN's running statistics does not give the statistics of
the averaged weights' quantized network (SWA re-computes them for that reason), and in
mid-schedule the running statistics trail weights that keep moving.

With `--refresh`, the live weights' `mse` clipping ratios are also searched afresh, as QAT does
every 100 steps (`WeightQuantizer.refresh_ratio`), and the top-1 printed right after (what an
epoch ending a step after a refresh reports) and once BN is re-estimated for the new grid.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mpq.config import recipe_from_dict  # noqa: E402
from mpq.errors import UsageError  # noqa: E402
from mpq.qat import QATRecipe  # noqa: E402
from mpq.quant import quant_layers, reestimate_bn_  # noqa: E402
from mpq.timing import cpu_summary  # noqa: E402
from mpq.trainer import evaluate, make_loaders  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path,
                   help="QAT run folders, or copies of their checkpoint_last.pt")
    p.add_argument("--data-root", required=True)
    p.add_argument("--bn-batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--refresh", action="store_true",
                   help="also search the live weights' mse clipping ratios afresh")
    args = p.parse_args()
    if args.bn_batches < 1:
        p.error(f"--bn-batches must be >= 1, got {args.bn_batches}")
    torch.set_num_threads(args.threads)
    payloads = {}
    for run in args.runs:
        path = run if run.suffix == ".pt" else run / "checkpoint_last.pt"
        if not path.is_file():
            raise UsageError(f"{path} not found: pass a QAT run folder (train.py --out) or a "
                             f"copy of its checkpoint_last.pt")
        payloads[run] = (path, load_checkpoint(path))
    print(f"CPU: {cpu_summary()}, {args.threads} threads; BN re-estimated on "
          f"{args.bn_batches} augmented training batches")
    for run, (path, payload) in payloads.items():
        recipe = recipe_from_dict(payload["recipe"], QATRecipe)
        train, test = make_loaders(recipe, data_root=args.data_root,
                                   device=torch.device("cpu"), progress=False)
        model = model_from_checkpoint(payload, path=path)
        live = {k: v.clone() for k, v in model.state_dict().items()}
        averaged = [("average", payload["ema"]["average"])] if "ema" in payload else []
        for label, weights in (("live", live), *averaged):
            model.load_state_dict(weights, strict=False)
            before = evaluate(model, test)["top1"]
            reestimate_bn_(model, islice(train.epoch(recipe.train.epochs), args.bn_batches))
            after = evaluate(model, test)["top1"]
            print(f"{run} (epoch {payload['epoch'] + 1}): {label} weights {before:.2f}%, BN "
                  f"re-estimated {after:.2f}%", flush=True)
        if args.refresh:
            model.load_state_dict(live)
            moved = []  # each layer's mean relative change of its channels' ratios
            for layer in quant_layers(model).values():
                q = layer.weight_quant
                if q is not None and q.mode == "mse":
                    old = q.ratio.clone()
                    q.refresh_ratio(layer.effective_weight().detach())
                    moved.append(((q.ratio - old).abs() / old).mean().item())
            if not moved:
                print(f"{run}: no mse weight scale to refresh")
                continue
            now = evaluate(model, test)["top1"]
            reestimate_bn_(model, islice(train.epoch(recipe.train.epochs), args.bn_batches))
            after = evaluate(model, test)["top1"]
            mean = 100 * sum(moved) / len(moved)
            print(f"{run}: live weights, ratios refreshed (each layer's moved {mean:.1f}% on "
                  f"average, at most {100 * max(moved):.1f}%) {now:.2f}%, BN re-estimated "
                  f"{after:.2f}%", flush=True)


if __name__ == "__main__":
    main()
