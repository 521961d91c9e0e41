"""QAT step time against the FP32 step, side by side with torch.ao's own QAT, in one run.

    python benchmarks/qat_step.py [--batch 128] [--steps 20] [--threads 2]

Every variant trains ResNet20 on the same batch (channels_last, SGD, batch 128 by default);
rounds interleave the variants so machine noise hits them alike, and the median step is kept.
Reported: mpq's student step (fake-quantized W4A8 forward + backward + update), the same with
the teacher's forward (the whole distillation step) as QAT runs it (the teacher's BN folded into
its convs, `mpq.distill.folded_teacher`) and with the teacher as it is, and torch.ao's FX QAT
(x86 qconfig). With `--compile`, the FP32 step and QAT's step again with the networks through
`torch.compile` (the first, compiling step is timed apart), and the graph breaks dynamo finds in
the student.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.models import build_model  # noqa: E402
from mpq.distill import distillation_loss, folded_teacher  # noqa: E402
from mpq.quant import calibrate_, prepare_qat, quantizable_layers, uniform_plan  # noqa: E402


def torch_ao_qat(model, example):
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return prepare_qat_fx(copy.deepcopy(model).train(),
                              get_default_qat_qconfig_mapping("x86"), (example,))


def make_step(model, x, y, teacher=None):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                          momentum=0.9)

    def step():
        if teacher is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.no_grad():
                t = teacher(x)
            loss, _ = distillation_loss(model(x), t, y, alpha=0.9, temperature=4.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--w-bits", type=int, default=4)
    parser.add_argument("--compile", action="store_true",
                        help="also time the FP32 and QAT steps under torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(args.batch, 3, 32, 32).contiguous(memory_format=cl)
    y = torch.randint(0, 10, (args.batch,))
    fp32 = build_model("resnet20").to(memory_format=cl)
    teacher = copy.deepcopy(fp32).eval()
    plan = uniform_plan("resnet20", quantizable_layers(fp32), w_bits=args.w_bits)
    student = prepare_qat(fp32, plan, example_inputs=(x[:2],)).to(memory_format=cl)
    calibrate_(student, [x])
    student.train()
    ao = torch_ao_qat(fp32, x[:2]).to(memory_format=cl)
    variants = {
        "fp32": make_step(fp32.train(), x, y),
        f"mpq W{args.w_bits}A8 student": make_step(student, x, y),
        f"mpq W{args.w_bits}A8 + teacher, BN folded (QAT's step)": make_step(
            student, x, y, folded_teacher(teacher)),
        f"mpq W{args.w_bits}A8 + teacher, BN unfolded": make_step(student, x, y, teacher),
        "torch.ao FX QAT (x86, W8A8)": make_step(ao, x, y),
    }
    if args.compile:
        breaks = torch._dynamo.explain(copy.deepcopy(student))(x).graph_break_count
        variants["fp32, torch.compile"] = make_step(torch.compile(copy.deepcopy(fp32)), x, y)
        variants[f"mpq W{args.w_bits}A8 QAT's step, torch.compile"] = make_step(
            torch.compile(copy.deepcopy(student)), x, y,
            torch.compile(folded_teacher(copy.deepcopy(teacher))))
    times = {name: [] for name in variants}
    first = {}
    for name, step in variants.items():  # warm-up; the first step compiles
        start = time.perf_counter()
        step()
        first[name] = time.perf_counter() - start
        for _ in range(2):
            step()
    for _ in range(args.steps):
        for name, step in variants.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    base = statistics.median(times["fp32"])
    print(f"ResNet20, batch {args.batch}, {args.threads} threads, channels_last, "
          f"median of {args.steps} interleaved steps, torch {torch.__version__}")
    print(f"{'variant':48s} {'step ms':>9s} {'vs fp32':>8s}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:48s} {med * 1e3:9.1f} {med / base:7.2f}x")
    if args.compile:
        compiled = ", ".join(f"{name}: {first[name]:.1f} s" for name in variants
                             if "compile" in name)
        print(f"first (compiling) step: {compiled}; dynamo's graph breaks in the student: "
              f"{breaks}")


if __name__ == "__main__":
    main()
