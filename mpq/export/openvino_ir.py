"""The int8 QDQ model as an OpenVINO IR (`model_int8.xml` and `.bin`), for OpenVINO's CPU plugin,
which runs it on its own int8 kernels. Optional: `pip install 'mpq[openvino]'`.

Read as it is, OpenVINO does not compute our QDQ graph: its CPU plugin fuses a residual add into
the conv before it (Conv -> FakeQuantize -> Add -> ... -> FakeQuantize) and skips rounding that
conv's output onto its grid, by design (openvinotoolkit/openvino#5405). On ResNet20 that moved
up to a fifth of a block's outputs by a step and top-1 by -0.08 to +0.21 points against ONNX
Runtime. `for_openvino` rounds those conv outputs explicitly (Div, Round, Clip, Mul: the identity on a
value already on its grid), and everything here that hands a model to OpenVINO (the IR, the
evaluations, the timings) reads it through that: then every committed ResNet20 row's top-1 in
OpenVINO is within 0.03 of ONNX Runtime's.
The rewrite is OpenVINO's only: in ONNX Runtime it would stop DQ -> Add -> Q fusing into
QLinearAdd (a one-off timing found it about twice as slow), so `model_int8.onnx` stays as is.
The export checks the IR on the test set as it checks the other int8 models (`mpq.export.run`).
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import UsageError

__all__ = ["OPENVINO_FILES", "for_openvino", "openvino_model", "openvino_predict",
           "require_openvino", "save_openvino_ir"]

OPENVINO_FILES = ("model_int8.xml", "model_int8.bin")


def require_openvino():
    """The `openvino` module, or a `UsageError` saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UsageError("the OpenVINO export needs openvino: pip install 'mpq[openvino]' "
                         "(or pip install openvino)") from None
    return openvino


_PRODUCERS = ("Conv", "Gemm", "MatMul")
_JOINS = ("Add", "Sum")


def for_openvino(model):
    """A copy of a QDQ `onnx.ModelProto` in which every value a conv or matmul requantizes for
    an addition (producer -> QuantizeLinear -> DequantizeLinear -> Add) is rounded onto its
    grid again on that edge: `clip(round(x / scale), lo, hi) * scale`, the identity on the
    dequantized value, which OpenVINO's fusion cannot skip."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    inserts = []
    for node in graph.node:
        if node.op_type not in _JOINS:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" \
                else None
            source = producer.get(q.input[0]) if q is not None and \
                q.op_type == "QuantizeLinear" else None
            if source is None or source.op_type not in _PRODUCERS:
                continue
            scale, zero = constants[dq.input[1]], constants[dq.input[2]]
            if scale.size != 1:
                continue  # per-tensor activations only; per-channel ones are left as they are
            info = np.iinfo(zero.dtype)
            new = f"{name}_openvino_grid"
            graph.initializer.extend([
                numpy_helper.from_array(scale.astype(np.float32).reshape(()), f"{new}_scale"),
                numpy_helper.from_array(np.float32(info.min - int(zero)), f"{new}_low"),
                numpy_helper.from_array(np.float32(info.max - int(zero)), f"{new}_high")])
            inserts.append((node, [
                helper.make_node("Div", [name, f"{new}_scale"], [f"{new}_steps"]),
                helper.make_node("Round", [f"{new}_steps"], [f"{new}_rounded"]),
                helper.make_node("Clip", [f"{new}_rounded", f"{new}_low", f"{new}_high"],
                                 [f"{new}_clipped"]),
                helper.make_node("Mul", [f"{new}_clipped", f"{new}_scale"], [new])]))
            node.input[i] = new
    for consumer, nodes in inserts:  # each before its consumer: the graph stays sorted
        at = list(graph.node).index(consumer)
        for k, inserted in enumerate(nodes):
            graph.node.insert(at + k, inserted)
    onnx.checker.check_model(model)
    return model


def openvino_model(path: str | os.PathLike):
    """The `openvino.Model` to run for `path`: an IR as it is, an ONNX model through
    `for_openvino`."""
    ov = require_openvino()
    if str(path).endswith(".onnx"):
        import onnx

        return ov.Core().read_model(for_openvino(onnx.load(str(path))).SerializeToString())
    return ov.Core().read_model(str(path))


def save_openvino_ir(onnx_path: str | os.PathLike, xml_path: str | os.PathLike) -> None:
    """Writes the QDQ ONNX model at `onnx_path` as an IR at `xml_path` (and its `.bin`): the
    graph OpenVINO's runtime reads from the ONNX file after `for_openvino`, so the IR computes
    what that file computes in ONNX Runtime (`openvino.convert_model`'s own passes moved some
    requantizations of a ResNet20 by a step). Float constants stay float32, not OpenVINO's
    default float16."""
    ov = require_openvino()
    ov.save_model(openvino_model(onnx_path), str(xml_path), compress_to_fp16=False)


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
    compiled = ov.Core().compile_model(openvino_model(path), "CPU", config)
    return lambda x: compiled(np.ascontiguousarray(x, dtype=np.float32))[0]
