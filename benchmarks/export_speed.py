"""Inference speed of the exported int8 models against FP32, side by side in one run.

    python benchmarks/export_speed.py [--checkpoint CK] [--threads 2] [--seconds 3]

Runtimes: PyTorch FP32 eager (channels_last), ONNX Runtime FP32, OpenVINO FP32 (the FP32 ONNX
model, float32 compute), our int8 on PyTorch's x86 kernels (TorchScript), our int8 QDQ model in
ONNX Runtime and in OpenVINO (which reads it directly), and torch.ao's own FX int8 PTQ with
fusion as the reference users know; batch 1 and 256, 2 threads. OpenVINO runs with
INFERENCE_NUM_THREADS at --threads, the latency hint at batch 1 and the throughput hint at 256
(the batch split across the requests it recommends); without openvino installed
(`pip install 'mpq[openvino]'`) its lines are skipped with a note. With a QAT checkpoint (from
`train.py --plan/--bits`) its own export is timed; without one a W4A8 ResNet20 calibrated on
random inputs (speed does not depend on the weights' values; sub-8-bit weights run in int8).
Prints milliseconds per batch (median of runs interleaved across the runtimes) and each
runtime's speed-up over the best FP32 runtime at that batch size; the first line names the CPU
and its int8 instruction sets (AVX2, AVX-512 VNNI, AMX), which decide the int8 kernels.
"""

import argparse
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mpq.checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from mpq.export.onnx_qdq import export_onnx  # noqa: E402
from mpq.export.torch_int8 import save_torch_int8  # noqa: E402
from mpq.models import build_model  # noqa: E402
from mpq.quant import calibrate_, prepare_qat, quantizable_layers, uniform_plan  # noqa: E402
from mpq.timing import (cpu_summary, openvino_runner, openvino_version, ort_runner,  # noqa: E402
                         side_by_side)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a QAT checkpoint (default: W4A8 ResNet20, random)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()

    import onnxruntime as ort
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    calib = [torch.randn(64, 3, 32, 32) for _ in range(2)]
    if args.checkpoint:
        payload = load_checkpoint(args.checkpoint)
        qmodel = model_from_checkpoint(payload).eval()
        fp32 = build_model(payload["model"]["name"], num_classes=payload["model"]["num_classes"])
        size = payload.get("input_size", 32)
    else:
        fp32 = build_model("resnet20", num_classes=10).eval()
        qmodel = prepare_qat(fp32, uniform_plan("resnet20", quantizable_layers(fp32), w_bits=4),
                             example_inputs=(calib[0][:1],))
        calibrate_(qmodel, calib)
        size = 32
    fp32.eval()
    shape = (3, size, size)
    tmp = Path(tempfile.mkdtemp())
    export_onnx(qmodel.eval(), tmp / "int8.onnx", input_shape=shape)
    int8 = save_torch_int8(qmodel, tmp / "int8.pt", input_shape=shape)
    torch.onnx.export(fp32, (torch.zeros(2, *shape),), str(tmp / "fp32.onnx"), dynamo=True,
                      input_names=["input"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), verbose=False,
                      external_data=False)
    ao = prepare_fx(fp32, get_default_qconfig_mapping("x86"), (calib[0],))
    for x in calib:
        ao(x)
    ao = convert_fx(ao)

    fp32_cl = fp32.to(memory_format=torch.channels_last)
    runtimes = {
        "pytorch_fp32": (lambda x: fp32_cl(x.contiguous(memory_format=torch.channels_last)), True),
        "onnxruntime_fp32": (ort_runner(tmp / "fp32.onnx", args.threads), True),
        "torch_ao_int8_ptq": (ao, False),
        "mpq_int8_pytorch": (int8, False),
        "mpq_int8_onnxruntime": (ort_runner(tmp / "int8.onnx", args.threads), False),
    }
    openvino = openvino_version()
    if openvino:
        runtimes["openvino_fp32"] = (openvino_runner(tmp / "fp32.onnx", args.threads), True)
        runtimes["mpq_int8_openvino"] = (openvino_runner(tmp / "int8.onnx", args.threads), False)
    print(f"CPU: {cpu_summary()}")
    print(f"ResNet20-sized input {shape}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, "
          + (f"openvino {openvino}" if openvino else
             "openvino not installed, skipped (pip install 'mpq[openvino]')"))
    for batch in (1, 256):
        x = torch.randn(batch, *shape)
        with torch.inference_mode():
            ms = side_by_side({name: fn for name, (fn, _) in runtimes.items()}, x,
                              seconds=args.seconds)
        best_fp32 = min(v for k, v in ms.items() if runtimes[k][1])
        best_int8 = min(v for k, v in ms.items() if not runtimes[k][1])
        print(f"\nbatch {batch}")
        for name, v in ms.items():
            print(f"  {name:22s} {v:9.3f} ms   {best_fp32 / v:5.2f}x best FP32")
        print(f"  best int8 / best FP32: {best_fp32 / best_int8:.2f}x faster")


if __name__ == "__main__":
    main()
