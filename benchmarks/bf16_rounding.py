"""What bf16 does to a QAT student: activation integers it moves, and one step's gradients.

    python benchmarks/bf16_rounding.py --data-root ~/.cache/mpq/cifar10-jpeg \
        [--plan checkpoints/resnet20_cifar10/mpq_13x/plan.json] [--threads 1]

The plan's student of the committed ResNet20 teacher (the QAT recipe's quantizers, activation
scales calibrated as QAT starts), one augmented training batch:
- eval mode, the same input in float32, under bf16 autocast and with `bf16-emulated`: the share
  of each activation quantizer's integers that differ from float32's, and between native and
  emulated bf16;
- training mode, one distillation step (the QAT loss) in float32 and under bf16 autocast: how far
  each parameter's gradient moves (relative L2 difference, cosine).
Where the CPU has no native bf16, torch emulates it (slowly: one batch still takes seconds).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
from itertools import islice
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.config import load_recipe  # noqa: E402
from mpq.distill import distillation_step_loss  # noqa: E402
from mpq.precision import EMULATED_BF16, autocast, cpu_has_fast_bf16  # noqa: E402
from mpq.qat import QATRecipe, quantized_model, start_quantized_  # noqa: E402
from mpq.quant import ActQuantizer, load_plan  # noqa: E402
from mpq.timing import cpu_summary  # noqa: E402
from mpq.trainer import make_loaders  # noqa: E402

CPU = torch.device("cpu")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "emulated": EMULATED_BF16}


def activation_integers(student, x) -> dict[str, dict[str, torch.Tensor]]:
    """Each activation quantizer's output on `x` (eval mode), per precision."""
    outs: dict[str, dict[str, torch.Tensor]] = {p: {} for p in PRECISIONS}
    current = []
    hooks = [m.register_forward_hook(
        lambda m, i, o, n=name: outs[current[0]].__setitem__(n, o.detach().float()))
        for name, m in student.named_modules() if isinstance(m, ActQuantizer)]
    student.eval()
    with torch.no_grad():
        for label, dtype in PRECISIONS.items():
            current[:] = [label]
            with autocast(CPU, dtype):
                student(x)
    for h in hooks:
        h.remove()
    return outs


def step_gradients(student, loss_fn, x, y, dtype) -> dict[str, torch.Tensor]:
    net = copy.deepcopy(student).train()
    with autocast(CPU, dtype):
        loss, _, _ = loss_fn(net, x, y)
    loss.backward()
    return {n: p.grad.detach().flatten() for n, p in net.named_parameters() if p.grad is not None}


def _span(values) -> str:
    return (f"{min(values):.1f}-{max(values):.1f} (median {statistics.median(values):.1f})")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--recipe", default=str(ROOT / "recipes/resnet20_cifar10_qat.yaml"))
    p.add_argument("--teacher", default=str(ROOT / "checkpoints/resnet20_cifar10.pt"))
    p.add_argument("--plan", default=str(ROOT / "checkpoints/resnet20_cifar10/mpq_13x/plan.json"))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, cls=QATRecipe)
    teacher = load_teacher(args.teacher, model_name=recipe.model.name,
                           num_classes=recipe.model.num_classes)
    student = quantized_model(teacher, load_plan(args.plan), recipe.qat)
    train, _ = make_loaders(recipe, data_root=args.data_root, device=CPU, progress=False)
    batches = list(islice(train.epoch(0), recipe.qat.calibration_batches + 1))
    start_quantized_(student, recipe.qat, [x for x, _ in batches[:-1]])
    x, y = batches[-1]
    print(f"CPU: {cpu_summary()}; native bf16: {cpu_has_fast_bf16()}; {args.threads} threads; "
          f"plan {args.plan}; one batch of {len(x)} augmented training images")

    outs = activation_integers(student, x)
    for label in ("bf16", "emulated"):
        moved = [100 * (outs[label][n] != outs["fp32"][n]).float().mean().item()
                 for n in outs["fp32"]]
        print(f"activation integers moved from float32's under {label}, % per quantizer: "
              f"{_span(moved)}")
    apart = [100 * (outs["bf16"][n] != outs["emulated"][n]).float().mean().item()
             for n in outs["fp32"]]
    print(f"native against emulated bf16, % of integers apart per quantizer: "
          f"{min(apart):.4f}-{max(apart):.4f}; the same in {apart.count(0.0)} of {len(apart)}")

    loss_fn = distillation_step_loss(teacher.eval(), recipe.qat, student)
    g32 = step_gradients(student, loss_fn, x, y, None)
    g16 = step_gradients(student, loss_fn, x, y, torch.bfloat16)
    rel = [100 * ((g32[n] - g16[n]).norm() / g32[n].norm()).item() for n in g32]
    cos = [torch.nn.functional.cosine_similarity(g32[n], g16[n], dim=0).item() for n in g32]
    print(f"one distillation step, bf16 against float32, over {len(g32)} parameter tensors: "
          f"gradient moved by {_span(rel)} % (relative L2), cosine {min(cos):.3f}-{max(cos):.4f}")


if __name__ == "__main__":
    main()
