"""Sensitivity at ImageNet scale: time and peak memory of the default estimator, side by side.

    python benchmarks/scale.py [--images 64] [--configs resnet18:10,resnet18:1000,...]
                               [--device cpu] [--threads 2]

Each configuration runs `mpq.hessian.layer_sensitivity` with its defaults (every layer's trace
at <= 5% relative standard error, and its top eigenvalue) in a fresh process, on synthetic
224 px images and randomly initialised torchvision models, so its peak RSS is its own:
resnet18 with 10, 100 and 1000 classes, resnet50 with 1000, and a smooth depthwise network
(hardswish, squeeze-excitation gates; about 30 layers and 0.4M weights) on 32 px images at
batch 128. Prints seconds, peak RSS, the estimators used and the worst relative standard
error, and the 1000-to-10-class time ratio of resnet18.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = "resnet18:10,resnet18:100,resnet18:1000,resnet50:1000,smooth:10"


class SEBlock(nn.Module):
    """Inverted residual: 1x1 expand, depthwise 3x3, squeeze-excitation gate, 1x1 project."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int):
        super().__init__()
        mid = cin * expand
        self.expand = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid),
                                    nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False),
                                nn.BatchNorm2d(mid), nn.Hardswish())
        self.squeeze = nn.Conv2d(mid, max(8, mid // 4), 1)
        self.excite = nn.Conv2d(max(8, mid // 4), mid, 1)
        self.project = nn.Sequential(nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        h = self.dw(self.expand(x))
        s = torch.relu(self.squeeze(h.mean((2, 3), keepdim=True)))
        h = h * torch.sigmoid(self.excite(s))
        out = self.project(h)
        return out + x if self.residual else out


class SmoothNet(nn.Module):
    """A small MobileNetV3-like network: 6 blocks of 5 layers, stem and head (32 layers)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        spec = [(16, 32, 4, 2), (32, 32, 4, 1), (32, 64, 4, 2), (64, 64, 4, 1), (64, 112, 4, 2),
                (112, 112, 4, 1)]
        self.blocks = nn.Sequential(*[SEBlock(*s) for s in spec])
        self.fc = nn.Linear(112, num_classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


def build(kind: str, classes: int) -> tuple[nn.Module, int, int]:
    """(model, image size, batch)."""
    if kind == "smooth":
        return SmoothNet(classes), 32, 128
    import torchvision

    return getattr(torchvision.models, kind)(num_classes=classes), 224, None


def one(kind: str, classes: int, images: int, device: str) -> dict:
    from mpq.hessian import layer_sensitivity

    torch.manual_seed(0)
    model, size, batch = build(kind, classes)
    model = model.to(device).eval()
    n = batch or images
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(n, 3, size, size, generator=g).to(device),
                torch.randint(0, classes, (n,), generator=g).to(device))]
    start = time.perf_counter()
    found = layer_sensitivity(model, batches)
    seconds = time.perf_counter() - start
    worst = max(s.trace_se / abs(s.trace) for s in found.values() if s.trace)
    return {"model": kind, "classes": classes, "images": n, "size": size,
            "weights": sum(s.numel for s in found.values()), "layers": len(found),
            "seconds": round(seconds, 1),
            "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20, 2),
            "estimators": sorted({s.estimator for s in found.values()}),
            "quantities": sorted({s.quantity for s in found.values()}),
            "worst_rel_se": round(worst, 4),
            "draws": max(s.probes for s in found.values()),
            "eigenvalues": all(s.top_eigenvalue == s.top_eigenvalue for s in found.values())}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default=DEFAULT)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        kind, classes = args.one.split(":")
        print(json.dumps(one(kind, int(classes), args.images, args.device)))
        return
    rows = []
    print(f"torch {torch.__version__}, {args.threads} threads, device {args.device}")
    print("| model | classes | images | layers | weights | seconds | peak RSS | estimators "
          "| worst rel. SE | draws |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: | ---: |")
    for config in args.configs.split(","):
        done = subprocess.run([sys.executable, __file__, "--one", config, "--images",
                               str(args.images), "--device", args.device, "--threads",
                               str(args.threads)], capture_output=True, text=True)
        if done.returncode:
            print(f"| {config} | failed: {done.stderr.strip().splitlines()[-1]} |", flush=True)
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(r)
        print(f"| {r['model']} | {r['classes']} | {r['images']} @ {r['size']} px | "
              f"{r['layers']} | {r['weights'] / 1e6:.2f}M | {r['seconds']} | "
              f"{r['peak_rss_gb']} GB | {', '.join(r['estimators'])} ({', '.join(r['quantities'])})"
              f" | {r['worst_rel_se']:.3f} | {r['draws']} |", flush=True)
    by = {(r["model"], r["classes"]): r["seconds"] for r in rows}
    if ("resnet18", 10) in by and ("resnet18", 1000) in by:
        print(f"resnet18, 1000 classes / 10 classes: "
              f"{by[('resnet18', 1000)] / by[('resnet18', 10)]:.2f}x the time")


if __name__ == "__main__":
    main()
