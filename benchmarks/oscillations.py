"""How often QAT's weights flip back between two integers (oscillate), measured from the teacher.

    python benchmarks/oscillations.py --data-root ~/.cache/mpq/cifar10-jpeg [--bits 2]
        [--lr 0.0025] [--settle 390] [--steps 400] [--threads 2]

Uniform `--bits` QAT of the committed ResNet20 teacher by the QAT recipe's loss (distillation)
and optimiser at a constant `--lr` (default 0.0025: the recipe's cosine schedule half-way): after
`--settle` steps (default one epoch), each weight's integer is read after every one of `--steps`
more. Reported: the integer changes per step, the share of them that undo the same weight's
previous change (an oscillation), the share of weights that oscillated at least k times, and the
share whose moving-average oscillation frequency (momentum 0.01, as `qat.freeze_oscillations`
tracks it) ends above each threshold: what that option would have frozen by then.
"""

from __future__ import annotations

import argparse
import sys
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.config import load_recipe  # noqa: E402
from mpq.distill import distillation_step_loss  # noqa: E402
from mpq.qat import QATRecipe, quantized_model  # noqa: E402
from mpq.quant import calibrate_, quant_layers, quantizable_layers, uniform_plan  # noqa: E402
from mpq.quant.modules import OSCILLATION_MOMENTUM, oscillation_step  # noqa: E402
from mpq.timing import cpu_summary  # noqa: E402
from mpq.trainer import make_loaders, make_optimizer  # noqa: E402


@torch.no_grad()
def integers(layers: dict) -> dict:
    """Each quantized layer's weight on its integer grid, as training computes it now."""
    out = {}
    for name, m in layers.items():
        w, q = m.effective_weight(), m.weight_quant
        was = q.training
        q.eval()  # reads the scale without advancing the quantizer's step count
        out[name] = q.integers(w, q.compute_scale(w, m.scale_unit()))
        q.train(was)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.0025)
    p.add_argument("--settle", type=int, default=390, help="steps before measuring")
    p.add_argument("--steps", type=int, default=400, help="steps measured")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    recipe = load_recipe(ROOT / "recipes/resnet20_cifar10_qat.yaml",
                         ["train.precision=fp32", f"train.lr={args.lr}", "train.schedule=constant",
                          f"train.max_steps={args.settle + args.steps}"], cls=QATRecipe)
    teacher = load_teacher(ROOT / "checkpoints/resnet20_cifar10.pt", model_name="resnet20",
                           num_classes=10, normalization={"mean": list(recipe.data.mean),
                                                          "std": list(recipe.data.std)}).eval()
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=args.bits)
    student = quantized_model(teacher, plan, recipe.qat)
    train, _ = make_loaders(recipe, data_root=args.data_root, device=torch.device("cpu"),
                            progress=False)
    calibrate_(student, (x for x, _ in islice(train.epoch(0), recipe.qat.calibration_batches)))
    loss_fn = distillation_step_loss(teacher, recipe.qat, student)
    optimizer, _ = make_optimizer(student, recipe.train, args.settle + args.steps)
    layers = {n: m for n, m in quant_layers(student).items() if m.w_bits is not None}

    def batches():
        epoch = 0
        while True:
            yield from train.epoch(epoch)
            epoch += 1

    student.train()
    stats = None
    for step, (x, y) in enumerate(islice(batches(), args.settle + args.steps)):
        loss, _, _ = loss_fn(student, x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step + 1 < args.settle:
            continue
        now = integers(layers)
        if stats is None:  # the first reading: nothing to compare with yet
            stats = {n: {"last": k, "dir": torch.zeros_like(k), "count": torch.zeros_like(k),
                         "freq": torch.zeros_like(k)} for n, k in now.items()}
            changes = oscillations = 0
            continue
        for n, k in now.items():
            s = stats[n]
            changed, back, s["dir"] = oscillation_step(k, s["last"], s["dir"])
            changes += int(changed.sum())
            oscillations += int(back.sum())
            s["count"] += back
            s["freq"].mul_(1 - OSCILLATION_MOMENTUM).add_(back.float(),
                                                          alpha=OSCILLATION_MOMENTUM)
            s["last"] = k

    count = torch.cat([s["count"].flatten() for s in stats.values()])
    freq = torch.cat([s["freq"].flatten() for s in stats.values()])
    measured = args.steps - 1
    print(f"ResNet20 W{args.bits}A8 QAT from the teacher, lr {args.lr}, {args.settle} steps to "
          f"settle; {count.numel():,} weights over {measured} steps ({cpu_summary()})")
    print(f"integer changes per step: {changes / measured:.1f} "
          f"({changes / measured / count.numel() * 100:.3f}% of the weights); "
          f"{oscillations / max(changes, 1) * 100:.1f}% of them undo the weight's previous change")
    for k in (1, 2, 5, 10, 20):
        print(f"  oscillated at least {k:2d} times: {(count >= k).float().mean() * 100:6.2f}%")
    for f in (0.005, 0.01, 0.02, 0.04):
        print(f"  moving-average frequency above {f}: {(freq > f).float().mean() * 100:6.2f}%")


if __name__ == "__main__":
    main()
