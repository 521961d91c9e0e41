"""The int8 QDQ model as an OpenVINO IR (`model_int8.xml` and `.bin`), for OpenVINO's CPU plugin,
which runs it on its own int8 kernels. Optional: `pip install 'mpq[openvino]'`.

OpenVINO does not compute the QDQ graph exactly: it fuses each residual add into the conv before
it and skips rounding that conv's output onto its int8 grid, so a few near-tied predictions
differ from ONNX Runtime's and the fake-quantized model's. The export checks the IR on the test
set as it checks the other int8 models (`mpq.export.run`).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError

__all__ = ["OPENVINO_FILES", "openvino_predict", "require_openvino", "save_openvino_ir"]

OPENVINO_FILES = ("model_int8.xml", "model_int8.bin")


def require_openvino():
    """The `openvino` module, or a `UsageError` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UsageError("the OpenVINO export needs openvino: pip install 'mpq[openvino]' "
                         "(or pip install openvino)") from None
    return openvino


def save_openvino_ir(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> None:
    """Writes the QDQ ONNX model at `onnx_path` as an IR at `xml_path` (and its `.bin`): the
    graph OpenVINO's runtime reads from the ONNX file, so the IR computes what that file
    computes in OpenVINO (`openvino.convert_model`'s own passes moved some requantizations of
    a ResNet20 by a step). Float constants stay float32, not OpenVINO's default float16."""
    ov = require_openvino()
    ov.save_model(ov.Core().read_model(str(onnx_path)), str(xml_path), compress_to_fp16=False)


def openvino_predict(path: str | os.PathLike, *, threads: int | None = None):
    """`predict(x) -> logits` of an IR or ONNX model on OpenVINO's CPU plugin, (N, C, H, W)
    float32 arrays in; the float parts in float32 (OpenVINO's default on CPUs with native bf16
    is bf16), `threads` INFERENCE_NUM_THREADS (default: OpenVINO's)."""
    ov = require_openvino()
    import openvino.properties as props
    import openvino.properties.hint as hints

    config = {hints.inference_precision: ov.Type.f32,
              hints.performance_mode: hints.PerformanceMode.LATENCY}
    if threads:
        config[props.inference_num_threads] = threads
    compiled = ov.Core().compile_model(str(path), "CPU", config)
    return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[0]
