"""Data and training throughput at scale: the streaming loader against the in-memory one, and a
training step with and without autocast, side by side in one run.

    python benchmarks/train_speed.py --data-root ~/.cache/mpq/cifar10-jpeg \
        [--images 4096] [--workers 0,2] [--steps 3] [--threads 2] [--device cpu]
        [--models resnet20,resnet18,resnet50] [--skip loaders|steps]

Loaders: images per second of one training epoch over the first `--images` training images of
the CIFAR-10 copy at 32 px (pad-and-crop, flip), in memory (decoded once; the decode is timed
apart) and streamed from the JPEG files with each worker count. Steps: the median of `--steps`
(after two warm-up steps) of a forward, backward and SGD update in float32, under bf16
autocast and with bf16's rounding emulated in float32 (`train.precision: bf16-emulated`; fp16
too on CUDA), for ResNet20 at 32 px (batch 128) and torchvision resnet18 and resnet50
with 1000 classes at 224 px (batch 32 on the CPU, 256 on CUDA), FP32 and QAT (W4A8), and
with `torch.compile` on CUDA.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.config import DataConfig  # noqa: E402
from mpq.data import load_split, make_loader  # noqa: E402
from mpq.models import build_model  # noqa: E402
from mpq.precision import EMULATED_BF16, autocast, cpu_has_fast_bf16  # noqa: E402
from mpq.quant import calibrate_, prepare_qat, quantizable_layers, uniform_plan  # noqa: E402


def loaders(args) -> None:
    print("| loader | images | seconds | images/s |")
    print("| --- | ---: | ---: | ---: |")
    cfg = DataConfig(loader="memory")
    start = time.perf_counter()
    split = load_split(cfg, "train", root=args.data_root, progress=False)
    print(f"| memory: load (decode or cached) the whole split | {len(split)} | "
          f"{time.perf_counter() - start:.1f} | |")
    index = torch.arange(args.images)
    runs = [("memory", cfg, split.subset(index))]
    for w in args.workers:
        scfg = DataConfig(loader="stream", workers=w)
        runs.append((f"stream, {w} workers", scfg,
                     load_split(scfg, "train", root=args.data_root).subset(index)))
    for name, c, part in runs:
        loader = make_loader(part, c, batch_size=128, train=True, seed=0)
        start = time.perf_counter()
        n = sum(len(y) for _, y in loader.epoch(0))
        seconds = time.perf_counter() - start
        print(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.0f} |", flush=True)


def step_time(model, x, y, *, dtype, steps, device) -> float:
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                          momentum=0.9)
    times = []
    for i in range(steps + 2):  # two warm-up steps: the first model's first steps set up oneDNN
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def steps(args) -> None:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtypes = [("fp32", None), ("bf16", torch.bfloat16), ("bf16-emulated", EMULATED_BF16)] + (
        [("fp16", torch.float16)] if cuda else [])
    print("\n| model | batch | kind | " + " | ".join(f"{n} s/step" for n, _ in dtypes)
          + " | " + " | ".join(f"{n} / fp32" for n, _ in dtypes[1:]) + " |")
    print("| --- | ---: | --- |" + " ---: |" * (2 * len(dtypes) - 1))
    configs = [("resnet20", 10, 32, 128), ("resnet18", 1000, 224, 256 if cuda else 32),
               ("resnet50", 1000, 224, 256 if cuda else 32)]
    for name, classes, size, batch in configs:
        if name not in args.models:
            continue
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size, device=device).contiguous(
            memory_format=torch.channels_last)
        y = torch.randint(0, classes, (batch,), device=device)
        fp32 = build_model(name, num_classes=classes)
        qat = prepare_qat(fp32, uniform_plan(name, quantizable_layers(fp32), w_bits=4,
                                             a_bits=8),
                          example_inputs=(torch.zeros(2, 3, size, size),))
        calibrate_(qat, [x[:8].cpu()])
        kinds = [("fp32", fp32), ("qat w4a8", qat)]
        for kind, model in kinds:
            model = model.to(device).to(memory_format=torch.channels_last).train()
            variants = [("", model)] + ([(" + compile", torch.compile(model))] if cuda else [])
            for suffix, net in variants:
                t = [step_time(net, x, y, dtype=d, steps=args.steps, device=device)
                     for _, d in dtypes]
                print(f"| {name} | {batch} | {kind}{suffix} | "
                      + " | ".join(f"{v:.3f}" for v in t) + " | "
                      + " | ".join(f"{v / t[0]:.2f}x" for v in t[1:]) + " |", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root")
    parser.add_argument("--images", type=int, default=4096)
    parser.add_argument("--workers", default="0,2")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", default="", help="loaders or steps")
    parser.add_argument("--models", default="resnet20,resnet18,resnet50",
                        help="of resnet20, resnet18, resnet50 (bf16 emulated on a CPU without "
                             "native bf16 takes minutes a step for resnet50)")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    args.models = args.models.split(",")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_has_fast_bf16()}")
    if "loaders" not in args.skip:
        loaders(args)
    if "steps" not in args.skip:
        steps(args)


if __name__ == "__main__":
    main()
