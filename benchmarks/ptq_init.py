"""Where QAT starts: post-training top-1 of round-to-nearest against GPTQ's rounding.

    python benchmarks/ptq_init.py --data-root ~/.cache/mpq/cifar10-jpeg
        [--plan checkpoints/resnet20_cifar10/mpq_13x/plan.json] [--bits 2] [--bn-batches 16]
        [--threads 2]

The committed ResNet20 teacher quantized by the committed 13x plan and by uniform `--bits`
weights (activations at 8 bits), its activation scales calibrated as QAT calibrates them (the
QAT recipe's `calibration_batches` un-augmented training batches), then its weights rounded
either way (`qat.weight_init: nearest` or `gptq`, on the same batches). Reported for each: the
test top-1 of the exported computation (BN folded with the teacher's statistics), the same after
re-estimating BN's statistics on `--bn-batches` augmented training batches (what QAT's live BN
does within its first steps), the seconds GPTQ took, and per layer the output error each
rounding leaves (mean squared error against the float weight's output on the calibration
images, relative to that output's mean square).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.config import load_recipe  # noqa: E402
from mpq.data import make_loader  # noqa: E402
from mpq.qat import QATRecipe, quantized_model  # noqa: E402
from mpq.quant import (calibrate_, gptq_init_, load_plan, quantizable_layers,  # noqa: E402
                       reestimate_bn_, uniform_plan)
from mpq.timing import cpu_summary  # noqa: E402
from mpq.trainer import evaluate, make_loaders  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--plan", default=str(ROOT / "checkpoints/resnet20_cifar10/mpq_13x/plan.json"))
    p.add_argument("--bits", type=int, default=2, help="the uniform plan's weight bits")
    p.add_argument("--bn-batches", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    recipe = load_recipe(ROOT / "recipes/resnet20_cifar10_qat.yaml", ["train.precision=fp32"],
                         cls=QATRecipe)
    teacher = load_teacher(ROOT / "checkpoints/resnet20_cifar10.pt", model_name="resnet20",
                           num_classes=10, normalization={"mean": list(recipe.data.mean),
                                                          "std": list(recipe.data.std)}).eval()
    train, test = make_loaders(recipe, data_root=args.data_root, device=torch.device("cpu"),
                               progress=False)
    calib = make_loader(train.split, recipe.data, batch_size=recipe.train.batch_size,
                        train=False, device=torch.device("cpu"))
    inputs = [x for x, _ in islice(calib.epoch(0), recipe.qat.calibration_batches)]
    augmented = [x for x, _ in islice(train.epoch(0), args.bn_batches)]
    plans = {f"plan {Path(args.plan).parent.name}": load_plan(args.plan),
             f"uniform W{args.bits}A8": uniform_plan("resnet20", quantizable_layers(teacher),
                                                     w_bits=args.bits)}
    print(f"CPU: {cpu_summary()}, {args.threads} threads; teacher "
          f"{evaluate(teacher, test)['top1']:.2f}%")
    for label, plan in plans.items():
        for init in ("nearest", "gptq"):
            student = quantized_model(copy.deepcopy(teacher), plan, recipe.qat)
            calibrate_(student, inputs)
            started = time.perf_counter()
            errors = gptq_init_(student, inputs) if init == "gptq" else {}
            seconds = time.perf_counter() - started
            top1 = evaluate(student, test)["top1"]
            reestimate_bn_(student, augmented)
            after = evaluate(student, test)["top1"]
            took = f", {seconds:.0f} s" if init == "gptq" else ""
            print(f"{label}, {init}: top-1 {top1:.2f}%, after BN re-estimation "
                  f"{after:.2f}%{took}", flush=True)
        for name, (nearest, gptq) in errors.items():
            print(f"  {name}: output error {nearest:.4f} -> {gptq:.4f}")


if __name__ == "__main__":
    main()
