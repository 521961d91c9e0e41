"""OpenVINO beside ONNX Runtime and PyTorch: its runner keeps every image of a split batch in
place, the results table times it on the same ONNX files and picks it where it is fastest, the
export writes a checked IR on request, its evaluator refuses bad input as eval_onnx.py does,
and (slow) its top-1 on every committed row. OpenVINO is optional (`pip install
'mpq[openvino]'`): without it these skip, and the export asks for it."""

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, TINY_RECIPE, run_script
from imagenet_layout import make_imagenet_layout
from mpq.errors import UsageError

sys.path.insert(0, str(ROOT / "benchmarks"))
import results_table as results  # noqa: E402
from results_table.latency import _models_to_time  # noqa: E402

COMMITTED = ROOT / "checkpoints" / "resnet20_cifar10"
ARTIFACTS = sorted(p for p in COMMITTED.glob("*") if (p / "model_int8.onnx").is_file())
DATA = os.environ.get("MPQ_DATA")


@pytest.fixture
def openvino():
    return pytest.importorskip("openvino", reason="openvino not installed: pip install "
                                                  "'mpq[openvino]'")


def test_a_batch_split_across_requests_comes_back_whole_and_in_order(openvino):
    from mpq.timing import openvino_runner

    model = COMMITTED / "qat_w4" / "model_int8.onnx"
    if not model.is_file():
        pytest.skip(f"needs the committed {model}")
    run = openvino_runner(model, threads=2)
    x = np.random.default_rng(0).standard_normal((8, 3, 32, 32)).astype(np.float32)
    one_by_one = np.concatenate([run(x[i:i + 1]) for i in range(len(x))])
    # batch 8: the throughput hint's requests, each a slice; batch 3 does not split evenly
    for batch in (x, x[:3]):
        logits = run(batch)
        assert logits.shape == (len(batch), 10)
        np.testing.assert_allclose(logits, one_by_one[:len(batch)], atol=1e-4)


def test_openvino_is_timed_on_the_onnx_files_onnx_runtime_times(tmp_path):
    export = tmp_path / "export"
    export.mkdir()
    for file in ("model_int8.onnx", "model_int8.pt"):
        (export / file).write_bytes(b"x")
    rows = {"qat_w4": {"export_dir": str(export)}}
    layout = results.Layout.of(ROOT, scratch=tmp_path)
    files, rebuilt = _models_to_time(layout, rows, data_root=None, openvino=True)
    assert list(files) == ["qat_w4/onnxruntime", "qat_w4/openvino", "qat_w4/pytorch"]
    assert files["qat_w4/openvino"] == files["qat_w4/onnxruntime"] == export / "model_int8.onnx"
    assert rebuilt == []
    assert "qat_w4/openvino" not in _models_to_time(layout, rows, data_root=None)[0]


def test_the_table_names_openvino_where_it_is_the_fastest_runtime():
    rows = {"fp32": {"top1": 89.57, "file": "model_fp32.onnx", "file_bytes": 1_171_834,
                     "epochs": 0},
            "mpq_13x": {"top1": 89.37, "file": "model.mpq", "file_bytes": 83_799, "epochs": 60}}
    latency = {"1": {"fp32/onnxruntime": 0.5, "fp32/openvino": 0.6, "mpq_13x/onnxruntime": 0.3,
                     "mpq_13x/openvino": 0.4, "mpq_13x/pytorch": 0.9},
               "256": {"fp32/onnxruntime": 350.0, "fp32/openvino": 340.0,
                       "mpq_13x/onnxruntime": 200.0, "mpq_13x/openvino": 85.0,
                       "mpq_13x/pytorch": 460.0}}
    lines = results.write_table(rows, latency, fp32_bytes=1_089_896).splitlines()
    assert "| 0.50 ms (onnxruntime) | 340.00 ms (openvino) |" in lines[2]
    assert "| 0.30 ms (onnxruntime) | 85.00 ms (openvino) |" in lines[3]


def _tiny_w4a8(tiny_teacher):
    """The tiny teacher at W4A8, calibrated, and its test batches."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.config import DataConfig
    from mpq.data import BatchLoader, load_split
    from mpq.quant import Plan, calibrate_, prepare_qat, quantizable_layers

    cfg = DataConfig(**TINY_RECIPE["data"])
    batches = list(BatchLoader(load_split(cfg, "test", num_classes=4), cfg, batch_size=64,
                               train=False).epoch(0))
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher)).eval()
    plan = Plan("resnet20", {name: {"w_bits": 4} for name in quantizable_layers(teacher)})
    size = cfg.image_size
    qmodel = prepare_qat(teacher, plan, example_inputs=(torch.zeros(1, 3, size, size),))
    calibrate_(qmodel, [x for x, _ in batches])
    meta = {"model": {"name": "resnet20", "num_classes": 4}, "input_size": size,
            "normalization": {"mean": [0.5] * 3, "std": [0.25] * 3}}
    return qmodel.eval(), meta, batches


def test_export_writes_an_openvino_ir_checked_as_the_other_int8_models(openvino, tmp_path,
                                                                        tiny_teacher):
    from mpq.export.openvino_ir import openvino_predict
    from mpq.export.run import ExportCheckFailed, export_model

    qmodel, meta, batches = _tiny_w4a8(tiny_teacher)
    out = tmp_path / "out"
    try:
        export_model(qmodel, meta, out, test_batches=batches, openvino=True)
    except ExportCheckFailed:  # its files stay for inspection; only OpenVINO may have missed
        pass
    report = json.loads((out / "export.json").read_text())
    assert report["checks"]["min_agreement"] == 99.5 and "openvino_agreement" in report
    assert all(f.startswith("openvino:") for f in report["checks"]["failures"])
    assert report["files"]["model_int8.bin"]["bytes"] == (out / "model_int8.bin").stat().st_size
    assert report["versions"]["openvino"] == openvino.__version__.split("-")[0]
    x = torch.cat([x for x, _ in batches]).numpy()
    # the IR is the ONNX model as OpenVINO reads it: float32 constants, not float16
    np.testing.assert_array_equal(openvino_predict(out / "model_int8.xml")(x),
                                  openvino_predict(out / "model_int8.onnx")(x))
    export_model(qmodel, meta, out, test_batches=None, force=True)  # a replaced export's IR
    assert not (out / "model_int8.xml").exists() and not (out / "model_int8.bin").exists()


def test_an_openvino_export_without_openvino_says_how_to_install_it(tmp_path, monkeypatch):
    from mpq.export.run import export_model

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    with pytest.raises(UsageError, match=r"pip install 'mpq\[openvino\]'"):
        export_model(torch.nn.Identity(), {"input_size": 8}, tmp_path / "out", openvino=True)
    assert not (tmp_path / "out").exists()


def test_eval_openvino_refuses_bad_models_and_arguments_in_one_line(openvino, tmp_path):
    data = make_imagenet_layout(tmp_path / "data", classes=2, train_per_class=1,
                                val_per_class=2, sizes=(12, 14))
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text('{"input": {"shape": [1, 3, 12, 12], "name": "input"},'
                                        ' "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}')
    (export / "model_int8.onnx").write_bytes(b"\x08\x07 not an onnx model")
    tool = [ROOT / "tools" / "eval_openvino.py", "--data-root", data, "--export", export]
    for args, match in (([], "cannot be loaded by OpenVINO"), (["--threads", "0"],
                                                               "--threads must be >= 1")):
        result = run_script(*tool, *args, timeout=120)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1 and match in lines[0], result.stderr


def _residual_block_onnx():
    """A QDQ residual block as our export writes one: a conv making the block's input x (ReLU,
    u8); conv, ReLU, u8; an int8 conv whose output is requantized (zero point 128) for the add
    of x; ReLU, requantized again for a last conv (an int8 consumer, as in a network). Scales far from round
    ratios, so the exact sums rarely tie."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    c = 16
    inits = {"s_in": np.float32(0.0213), "s_x": np.float32(0.0371), "s_h": np.float32(0.0293),
             "s_conv": np.float32(0.0317),
             "s_out": np.float32(0.0419), "u8": np.uint8(0), "mid": np.uint8(128),
             "w_zero": np.zeros(c, np.int8), "b_zero": np.zeros(c, np.int32)}
    nodes = [helper.make_node("QuantizeLinear", ["input", "s_in", "u8"], ["q0"]),
             helper.make_node("DequantizeLinear", ["q0", "s_in", "u8"], ["x0"])]
    for i, (source, scale, zero, out) in enumerate((("x0", "s_in", "s_x", "x"),
                                                   ("x", "s_x", "s_h", "h"),
                                                   ("h", "s_h", "s_conv", "y"))):
        inits[f"w{i}"] = rng.integers(-64, 64, (c, c, 3, 3)).astype(np.int8)
        inits[f"ws{i}"] = (rng.random(c) * 0.004 + 0.001).astype(np.float32)
        inits[f"b{i}"] = rng.integers(-2000, 2000, c).astype(np.int32)
        inits[f"bs{i}"] = inits[f"ws{i}"] * inits[scale]
        nodes += [helper.make_node("DequantizeLinear", [f"w{i}", f"ws{i}", "w_zero"], [f"wf{i}"],
                                   axis=0),
                  helper.make_node("DequantizeLinear", [f"b{i}", f"bs{i}", "b_zero"], [f"bf{i}"],
                                   axis=0),
                  helper.make_node("Conv", [source, f"wf{i}", f"bf{i}"], [f"c{i}"],
                                   pads=[1, 1, 1, 1])]
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        grid = "u8" if i < 2 else "mid"
        nodes += [helper.make_node("QuantizeLinear", [f"r{i}" if i < 2 else "c2", zero, grid],
                                   [f"q{i + 1}"]),
                  helper.make_node("DequantizeLinear", [f"q{i + 1}", zero, grid], [out])]
    nodes += [helper.make_node("Add", ["y", "x"], ["sum"]),
              helper.make_node("Relu", ["sum"], ["r"]),
              helper.make_node("QuantizeLinear", ["r", "s_out", "u8"], ["q4"]),
              helper.make_node("DequantizeLinear", ["q4", "s_out", "u8"], ["z"]),
              helper.make_node("DequantizeLinear", ["w0", "ws0", "w_zero"], ["wf3"], axis=0),
              helper.make_node("Conv", ["z", "wf3"], ["logits"], pads=[1, 1, 1, 1])]
    shape = [None, c, 16, 16]
    graph = helper.make_graph(
        nodes, "block", [helper.make_tensor_value_info("input", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, shape)],
        [numpy_helper.from_array(np.asarray(v), k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_openvino_reads_a_residual_blocks_qdq_graph_as_it_is_written(openvino, tmp_path):
    """Through `for_openvino`, OpenVINO computes the block as ONNX Runtime's int8 kernels do;
    read raw, its Conv-Add fusion skips the conv output's rounding (openvino 2026.4: 99% of the
    outputs moved). The rewrite is the identity in the graph as written (ONNX Runtime without
    optimisations)."""
    import onnx
    import onnxruntime as ort

    from mpq.export.openvino_ir import for_openvino, openvino_model

    model = _residual_block_onnx()
    rewritten = for_openvino(model)
    assert [n.op_type for n in rewritten.graph.node].count("Round") == 1  # the conv's edge only
    onnx.save(model, tmp_path / "block.onnx")
    onnx.save(rewritten, tmp_path / "rewritten.onnx")
    x = np.random.default_rng(1).random((16, 16, 16, 16), dtype=np.float32) * 4

    def literal(path):
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0]

    assert np.array_equal(literal(tmp_path / "rewritten.onnx"), literal(tmp_path / "block.onnx"))
    session = ort.InferenceSession(str(tmp_path / "block.onnx"), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": x})[0]  # its int8 kernels: QLinearConv, QLinearAdd
    compiled = openvino.Core().compile_model(openvino_model(tmp_path / "block.onnx"), "CPU",
                                             {"INFERENCE_PRECISION_HINT": "f32"})
    # A step of the last conv's input moves its outputs by ~1e-2; float rounding by ~1e-6.
    moved = np.mean(np.abs(compiled(x)[0] - expected) > 1e-4)
    assert moved == 0, f"{moved:.2%} of the outputs differ from ONNX Runtime's"
    raw = openvino.Core().compile_model(str(tmp_path / "block.onnx"), "CPU",
                                        {"INFERENCE_PRECISION_HINT": "f32"})
    print(f"read raw, OpenVINO moves {np.mean(np.abs(raw(x)[0] - expected) > 1e-4):.1%}")


@pytest.mark.slow
@pytest.mark.skipif(not DATA or not (Path(DATA) / "test").is_dir(),
                    reason="real CIFAR-10 not found: set MPQ_DATA to an ImageFolder copy "
                           "(make test does this when ../shared/data is present)")
@pytest.mark.skipif(not ARTIFACTS, reason="no rows committed under checkpoints/resnet20_cifar10/")
@pytest.mark.parametrize("folder", ARTIFACTS, ids=[p.name for p in ARTIFACTS])
def test_committed_onnx_in_openvino_keeps_onnx_runtimes_top1(openvino, folder, tmp_path):
    """OpenVINO's top-1 on each committed `model_int8.onnx`, read through mpq's IR conversion
    (`save_openvino_ir`: the file's graph with each residual add's conv input rounded
    explicitly, which OpenVINO's own fusion skips) and evaluated by tools/eval_openvino.py
    (OpenVINO, Pillow and NumPy only), equals ONNX Runtime's, recorded in export.json, within
    0.05 points (openvino 2026.4, AMD Zen 4: at most 0.03 apart over the twelve rows; read
    raw, -0.08 to +0.21)."""
    from mpq.export.openvino_ir import save_openvino_ir

    report = json.loads((folder / "export.json").read_text())
    shutil.copy2(folder / "export.json", tmp_path / "export.json")
    save_openvino_ir(folder / "model_int8.onnx", tmp_path / "model_int8.xml")
    result = run_script(ROOT / "tools" / "eval_openvino.py", "--export", tmp_path, "--data-root",
                        DATA, "--threads", "2", timeout=600)
    assert result.returncode == 0, result.stderr
    top1 = float(result.stdout.strip().splitlines()[-1].split("=")[1])
    assert abs(top1 - report["onnx_top1"]) <= 0.05, (top1, report["onnx_top1"])
