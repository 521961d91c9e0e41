"""What each way of keeping int8 kernels exact on every CPU costs in top-1, side by side.

    python benchmarks/int8_schemes.py --data-root ~/.cache/mpq/cifar10-jpeg [--checkpoint CK]

x86 CPUs without VNNI add two u8 x s8 products in int16 with saturation, so an 8-bit weight grid
of [-127, 127] under 8-bit activations computes other integers there than on VNNI, AMX or ARM.
Post-training quantization of the committed ResNet20 teacher (the `--ptq` recipe: 8 un-augmented
training batches calibrate, BN folded), for each scheme: the fake-quantized top-1 (what every
CPU computes when no kernel saturates), the ONNX Runtime and PyTorch int8 top-1 on *this* CPU,
and the largest pair sum the static proof (`mpq.export.overflow`) finds, against int16's 32,767.
"""

import argparse
import platform
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.config import load_recipe  # noqa: E402
from mpq.export.onnx_qdq import export_onnx  # noqa: E402
from mpq.export.overflow import int8_layer_bounds  # noqa: E402
from mpq.export.torch_int8 import save_torch_int8  # noqa: E402
from mpq.checkpoint import load_teacher  # noqa: E402
from mpq.qat import QATRecipe, quantized_model  # noqa: E402
from mpq.quant import calibrate_, freeze_bn_, quantizable_layers, uniform_plan  # noqa: E402
from mpq.quant.modules import full_range_int8_weights_  # noqa: E402
from mpq.trainer import evaluate, make_loaders  # noqa: E402
from mpq.timing import ort_runner  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# name -> (weight bits, activation bits, 8-bit weights on the full [-127, 127] grid)
SCHEMES = {
    "W8 [-127,127] A8 (before: saturates without VNNI)": (8, 8, True),
    "W8 [-64,64] A8 (mpq now)": (8, 8, False),
    "W7 [-63,63] A8": (7, 8, False),
    "W8 [-127,127] A7 (reduce_range activations)": (8, 7, True),
}


def cpu_name() -> str:
    flags, model = "", platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = line
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
           if f" {f}" in flags]
    return f"{model} ({', '.join(isa) or 'no AVX2'}; torch: {torch.backends.cpu.get_cpu_capability()})"


def worst_pair(qmodel) -> int:
    return max(max(b["pair_max"], -b["pair_min"]) for *_, b in int8_layer_bounds(qmodel))


@torch.no_grad()
def top1(fn, batches) -> float:
    correct = n = 0
    for x, y in batches:
        correct += int((np.asarray(fn(x)).argmax(1) == y.numpy()).sum())
        n += len(y)
    return 100.0 * correct / n


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(ROOT / "checkpoints/resnet20_cifar10.pt"))
    parser.add_argument("--recipe", default=str(ROOT / "recipes/resnet20_cifar10_qat.yaml"))
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(args.threads)
    recipe = load_recipe(args.recipe, ["train.channels_last=false"], cls=QATRecipe)
    teacher = load_teacher(args.checkpoint, model_name=recipe.model.name,
                           num_classes=recipe.model.num_classes)
    train, test = make_loaders(recipe, data_root=args.data_root, device=torch.device("cpu"))
    calib = [x for _, (x, _) in zip(range(recipe.qat.calibration_batches),
                                    type(test)(train.split, recipe.data,
                                               batch_size=recipe.train.batch_size,
                                               train=False, device=torch.device("cpu"))
                                    .epoch(0))]
    batches = list(test.epoch(0))
    print(f"CPU: {cpu_name()}; torch {torch.__version__}; {sum(len(y) for _, y in batches)} test images")
    print(f"teacher FP32 top-1 {evaluate(teacher, test)['top1']:.2f}")
    shape = (3, recipe.data.image_size, recipe.data.image_size)
    print(f"| scheme | fake-quant top-1 (every CPU) | ONNX Runtime here | PyTorch int8 here | "
          f"largest pair sum |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, (w_bits, a_bits, full) in SCHEMES.items():
        plan = uniform_plan(recipe.model.name, quantizable_layers(teacher), w_bits=w_bits,
                            a_bits=a_bits)
        q = quantized_model(teacher, plan, recipe.qat, input_size=shape[1])
        if full:
            full_range_int8_weights_(q)
        calibrate_(q, calib)
        freeze_bn_(q)
        q.eval()
        tmp = Path(tempfile.mkdtemp())
        export_onnx(q, tmp / "m.onnx", input_shape=shape)
        int8 = save_torch_int8(q, tmp / "m.pt", input_shape=shape)
        ort = ort_runner(tmp / "m.onnx", args.threads)
        print(f"| {name} | {top1(lambda x: q(x), batches):.2f} | "
              f"{top1(lambda x: ort(x)[0], batches):.2f} | {top1(int8, batches):.2f} | "
              f"{worst_pair(q):,} |", flush=True)


if __name__ == "__main__":
    main()
