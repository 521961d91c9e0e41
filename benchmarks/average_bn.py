"""What re-estimating BN's statistics buys a finished QAT run, and its weights' moving average.

    python benchmarks/average_bn.py RUN_DIR [RUN_DIR ...] --data-root ~/.cache/mpq/cifar10-jpeg
        [--bn-batches 200] [--threads 2]

Each RUN_DIR is a finished QAT run (its `checkpoint_last.pt`); one trained with
`train.ema_epochs` holds the live weights and their average, and both are measured. Averaging BN's running statistics does not give the
statistics of the averaged weights' quantized network (SWA re-computes them for that reason),
so for the live weights (and the average) this prints the test top-1 as trained and after
re-estimating BN (`mpq.quant.reestimate_bn_`, what `qat.bn_reestimate_batches` does) on
`--bn-batches` augmented training batches.
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
from mpq.quant import reestimate_bn_  # noqa: E402
from mpq.timing import cpu_summary  # noqa: E402
from mpq.trainer import evaluate, make_loaders  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", type=Path, help="finished QAT run folders")
    p.add_argument("--data-root", required=True)
    p.add_argument("--bn-batches", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if args.bn_batches < 1:
        p.error(f"--bn-batches must be >= 1, got {args.bn_batches}")
    torch.set_num_threads(args.threads)
    payloads = {}
    for run in args.runs:
        if not (run / "checkpoint_last.pt").is_file():
            raise UsageError(f"{run} holds no checkpoint_last.pt: pass a QAT run folder "
                             f"(train.py --out)")
        payloads[run] = load_checkpoint(run / "checkpoint_last.pt")
    print(f"CPU: {cpu_summary()}, {args.threads} threads; BN re-estimated on "
          f"{args.bn_batches} augmented training batches")
    for run, payload in payloads.items():
        recipe = recipe_from_dict(payload["recipe"], QATRecipe)
        train, test = make_loaders(recipe, data_root=args.data_root,
                                   device=torch.device("cpu"), progress=False)
        model = model_from_checkpoint(payload, path=run / "checkpoint_last.pt")
        live = {k: v.clone() for k, v in model.state_dict().items()}
        averaged = [("average", payload["ema"]["average"])] if "ema" in payload else []
        for label, weights in (("live", live), *averaged):
            model.load_state_dict(weights, strict=False)
            before = evaluate(model, test)["top1"]
            reestimate_bn_(model, islice(train.epoch(recipe.train.epochs), args.bn_batches))
            after = evaluate(model, test)["top1"]
            print(f"{run}: {label} weights {before:.2f}%, BN re-estimated {after:.2f}%",
                  flush=True)


if __name__ == "__main__":
    main()
