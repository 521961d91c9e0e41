"""Top-1 of an exported ONNX model on an ImageFolder test split in OpenVINO, with Pillow and
NumPy: no torch, no mpq, no ONNX Runtime. OpenVINO reads the QDQ model directly and runs its own
int8 kernels; this checks what it computes.

    python tools/eval_openvino.py --export DIR --data-root ROOT [--batch-size 256]
                                  [--threads N] [--precision f32|bf16|default]

As tools/eval_onnx.py (the same arguments, preprocessing from export.json and output), on
OpenVINO's CPU plugin. `--precision` is that of the graph's float parts (default f32, as the
ONNX model states them; `default` leaves OpenVINO's choice, bf16 on CPUs with native bf16).
The model is the export's OpenVINO IR (`model_int8.xml`, from `python -m mpq export --openvino`)
when it has one, else `model_int8.onnx`; `--model` names another. Read from the ONNX file,
OpenVINO skips rounding a conv's output where a residual add follows (its Conv-Add fusion), so
its top-1 can differ from ONNX Runtime's by a few tenths; the IR rounds there explicitly and
computes what the ONNX file states. It imports eval_onnx.py beside it (copy both).
"""

import sys
from pathlib import Path

from eval_onnx import arguments, evaluate, run


def openvino_model(threads: int | None, precision: str):
    """A loader of `predict(x) -> logits` in OpenVINO's CPU plugin, latency hint."""
    import openvino as ov
    import openvino.properties as props
    import openvino.properties.hint as hints
    from openvino.frontend import FrontEndManager

    core = ov.Core()
    config = {hints.performance_mode: hints.PerformanceMode.LATENCY}
    if threads:
        config[props.inference_num_threads] = threads
    if precision != "default":
        config[hints.inference_precision] = getattr(ov.Type, precision)

    def load(path):
        try:
            if path.suffix == ".onnx":  # the generic reader would try TensorFlow's too, which
                frontend = FrontEndManager().load_by_framework("onnx")  # logs its failure
                model = frontend.convert(frontend.load(str(path)))
            else:
                model = core.read_model(str(path))
        except Exception as exc:  # OpenVINO's messages open with source locations: drop them
            lines = [line for line in str(exc).splitlines() if line.strip() and not
                     line.startswith(("Exception from", "Check '", "FrontEnd API failed"))]
            raise RuntimeError(lines[0] if lines else type(exc).__name__) from None
        compiled = core.compile_model(model, "CPU", config)
        return lambda x: compiled(x)[0]
    return load


def main() -> int:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="INFERENCE_NUM_THREADS (default: OpenVINO's, every core)")
    parser.add_argument("--precision", choices=("f32", "bf16", "default"), default="f32",
                        help="precision of the graph's float parts (int8 parts stay int8)")
    parser.set_defaults(model=None)
    args = parser.parse_args()
    if args.model is None:
        ir = Path(args.export) / "model_int8.xml"
        args.model = ir.name if ir.is_file() else "model_int8.onnx"
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    try:
        import openvino  # noqa: F401
    except ImportError:
        print("error: openvino is not installed; pip install openvino (or 'mpq[openvino]')",
              file=sys.stderr)
        return 2
    return run(lambda: evaluate(args, openvino_model(args.threads, args.precision),
                                runtime="OpenVINO"))


if __name__ == "__main__":
    sys.exit(main())
