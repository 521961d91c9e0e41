"""ResNet20 / CIFAR-10 results: every row of the README's results table, from one command.

    python benchmarks/results.py [--data-root ROOT] [--rows fp32,mpq_13x,...] [--table-only]

Each row runs the commands a user would (recorded in its JSON), on the committed teacher
`checkpoints/resnet20_cifar10.pt`:

    fp32, fp16      the teacher, evaluated in float32 / with its weights in float16
    ao_int8_ptq     torch.ao FX static int8 PTQ (x86, conv+BN+ReLU fused), the seed's path
    ptq_w4, ptq_w2  uniform W4A8 / W2A8 post-training quantization (train.py --ptq), exported
    qat_w8          uniform W8A8 QAT, 2 epochs, exported
    qat_w4, qat_w2  uniform W4A8 / W2A8 QAT (the QAT recipe's 10 epochs), exported
    mpq_8x, mpq_13x, mpq_16x
                    search.py --budget, train.py --plan (QAT with distillation), exported;
                    13x gets 60 epochs (its target, <= 0.3 points lost, was missed at 10
                    and 30), 16x 30, 8x the recipe's 10. A budget below the smallest plan
                    (every layer at 2 bits) is recorded as infeasible, with that size.

A row whose `benchmarks/results/<row>.json` exists is not recomputed (delete it to redo one);
the searches and QAT runs under `runs/results/` resume where a killed run stopped. An mpq row
that no longer stands for its commands (its model.mpq weighs other than its search planned, so
the file format changed since; or its search, run again, picks other bits) is named on the
console and marked stale in the table, not silently kept. Then every finished row's latency
is measured side by side (batch 1 and 256, 2 threads, each row's best runtime; on a fresh
clone, models whose run folders are gone are rebuilt from the teacher and the committed
`model.mpq` files first), and the script writes `benchmarks/results/latency.json`, the README's
results table (between its `results:begin` / `results:end` markers), the accuracy-vs-size curve
to TensorBoard (`runs/results/tb`) and each exported row's small artifacts to
`checkpoints/resnet20_cifar10/`.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from timing import ort_runner, side_by_side  # noqa: E402

TEACHER = ROOT / "checkpoints" / "resnet20_cifar10.pt"
RESULTS = ROOT / "benchmarks" / "results"
RUNS = ROOT / "runs" / "results"
ARTIFACTS = ROOT / "checkpoints" / "resnet20_cifar10"
QAT_RECIPE = "recipes/resnet20_cifar10_qat.yaml"
SEARCH_RECIPE = "recipes/resnet20_cifar10.yaml"
ARTIFACT_FILES = ("plan.json", "model.mpq", "model_int8.onnx", "export.json")

# Rows in the table's order; they are computed in COMPUTE_ORDER (short rows first, the 30-epoch
# 13x QAT last, since the whole set spans sessions on a CPU).
ROWS = {
    "fp32": "FP32 teacher",
    "fp16": "FP16 weights (float32 compute)",
    "ao_int8_ptq": "torch.ao int8 PTQ, fused (seed's int8 path)",
    "ptq_w4": "uniform W4A8 PTQ",
    "ptq_w2": "uniform W2A8 PTQ",
    "qat_w8": "uniform W8A8 QAT",
    "qat_w4": "uniform W4A8 QAT",
    "qat_w2": "uniform W2A8 QAT",
    "mpq_8x": "mpq, 8x budget",
    "mpq_13x": "mpq, 13x budget",
    "mpq_16x": "mpq, 16x budget",
}
# QAT epochs where a row departs from the QAT recipe's.
QAT_EPOCHS = {"qat_w8": 2, "mpq_13x": 60, "mpq_16x": 30}
AO_CALIBRATION_BATCHES = 8
COMPUTE_ORDER = ["fp32", "fp16", "ao_int8_ptq", "ptq_w4", "ptq_w2", "qat_w8", "qat_w4",
                 "qat_w2", "mpq_8x", "mpq_13x", "mpq_16x"]


def _rel(path) -> str:
    """`path` as recorded in a row: relative to the repository when inside it, so the JSON
    reads the same on every clone."""
    path = Path(path)
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _in_repo(recorded: str) -> Path:
    """A recorded path back to a real one (older rows recorded absolute paths)."""
    path = Path(recorded)
    return path if path.is_absolute() else ROOT / path


def _printable(cmd: list) -> str:
    return " ".join(_rel(c) if isinstance(c, Path) else str(c) for c in cmd)


def _run(cmd: list, log: Path) -> None:
    """Runs one of the user's commands, its output appended to `log`; stops on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    printable = _printable(cmd)
    print(f"  $ {printable}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log, "a") as fh:
        fh.write(f"\n$ {printable}\n")
        fh.flush()
        code = subprocess.call([sys.executable, *map(str, cmd)], cwd=ROOT, env=env,
                               stdout=fh, stderr=subprocess.STDOUT)
    if code:
        sys.exit(f"command failed with exit code {code} (log: {log}): {printable}")


def _data_args(args) -> list:
    return ["--data-root", args.data_root] if args.data_root else []


def _exported_row(name: str, commands: list[list], export_dir: Path, log: Path) -> dict:
    for cmd in commands:
        _run(cmd, log)
    report = json.loads((export_dir / "export.json").read_text())
    metrics = json.loads((export_dir.parent / "metrics.json").read_text())
    return {"top1": report["onnx_top1"], "top1_source": "model_int8.onnx in ONNX Runtime",
            "file": "model.mpq", "file_bytes": report["mpq_bytes"],
            "onnx_bytes": report["files"]["model_int8.onnx"]["bytes"],
            "fake_quant_top1": report["fake_quant_top1"],
            "torch_int8_top1": report["torch_int8_top1"], "epochs": metrics["epochs"],
            "train_seconds": metrics.get("train_seconds"), "export_dir": _rel(export_dir),
            "commands": [_printable(c) for c in commands]}


def make_row(name: str, args) -> dict:
    """Computes one row (artifacts under runs/results/<name>)."""
    run = RUNS / name
    log = run / "log.txt"
    data = _data_args(args)
    qat = ["train.py", "--recipe", QAT_RECIPE, "--teacher", TEACHER, *data, "--quiet"]
    if name in QAT_EPOCHS:
        qat += ["--set", f"train.epochs={QAT_EPOCHS[name]}"]
    if name in ("ptq_w4", "ptq_w2"):
        bits = name[-1]
        return _exported_row(name, [[*qat, "--bits", bits, "--ptq", "--out", run / "qat"]],
                             run / "qat" / "export", log)
    if name.startswith("qat_w"):
        bits = name[-1]
        return _exported_row(name, [[*qat, "--bits", bits, "--out", run / "qat"]],
                             run / "qat" / "export", log)
    if name.startswith("mpq_"):
        budget = name.split("_")[1]
        floor = _smallest_plan(budget)
        if floor is not None:
            return floor
        search = ["search.py", "--recipe", SEARCH_RECIPE, "--checkpoint", TEACHER, *data,
                  "--budget", budget, "--out", run / "search", "--quiet"]
        train = [*qat, "--plan", run / "search" / "plan.json", "--out", run / "qat"]
        row = _exported_row(name, [search, train], run / "qat" / "export", log)
        plan = json.loads((run / "search" / "plan.json").read_text())
        row.update(budget_bytes=plan["budget_bytes"], plan_size_bytes=plan["size_bytes"])
        return row
    return _baseline_row(name, run, args)


def _smallest_plan(budget: str) -> dict | None:
    """None when the search recipe can meet `budget`; else the row saying it cannot (every layer
    at the fewest bits still makes a larger file), with the smallest plan's size."""
    from mpq.allocate import parse_budget
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.config import load_recipe
    from mpq.search import SearchRecipe, plan_floor
    from mpq.size import fp32_parameter_bytes

    recipe = load_recipe(ROOT / SEARCH_RECIPE, [], cls=SearchRecipe)
    model = model_from_checkpoint(load_checkpoint(TEACHER)).eval()
    fp32_bytes = fp32_parameter_bytes(model)
    budget_bytes = parse_budget(budget, fp32_bytes=fp32_bytes)
    floor = plan_floor(model, recipe)
    if budget_bytes >= floor.bytes:
        return None
    print(f"  infeasible: the budget is {budget_bytes} bytes, the smallest plan ({floor.bits} "
          f"bits everywhere) {floor.bytes} bytes, {floor.weight_bytes} of them weights", flush=True)
    return {"infeasible": True, "budget_bytes": budget_bytes, "smallest_bytes": floor.bytes,
            "smallest_weight_bytes": floor.weight_bytes, "smallest_bits": floor.bits,
            "smallest_compression": fp32_bytes / floor.bytes}


def stale(name: str, row: dict, runs: Path | None = None) -> str | None:
    """Why a finished mpq row no longer stands for what its commands make now, or None.

    Its search sized the plan in the `model.mpq` format of its day: when the file it exported
    weighs something else, the format changed since, and the search would now pick another
    plan at the same budget. When the search under `runs` (default: runs/results) was run again
    and picked other bits than the plan the row was trained on (its export's, or on a fresh
    clone its committed copy), the row is stale too."""
    if row.get("infeasible") or "plan_size_bytes" not in row:
        return None
    if row["file_bytes"] != row["plan_size_bytes"]:
        return (f"its search sized the plan at {row['plan_size_bytes']} bytes but its model.mpq "
                f"is {row['file_bytes']} bytes: the file format changed after the search")
    searched = (runs or RUNS) / name / "search" / "plan.json"
    trained = _in_repo(row["export_dir"]).parent / "plan.json" if "export_dir" in row else None
    if trained is None or not trained.is_file():
        trained = ARTIFACTS / name / "plan.json"
    if searched.is_file() and trained.is_file():
        bits = [{k: v["w_bits"] for k, v in json.loads(f.read_text())["layers"].items()}
                for f in (searched, trained)]
        if bits[0] != bits[1]:
            return (f"the search in {_rel(searched)} now picks other bits than the row's plan "
                    f"{_rel(trained)}")
    return None


def _test_batches(args):
    from mpq.checkpoint import load_checkpoint
    from mpq.export.run import test_batches_for

    return test_batches_for(load_checkpoint(TEACHER), data_root=args.data_root, progress=False)


@torch.no_grad()
def _top1(fn, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((fn(x).argmax(1) == y).sum())
        total += len(y)
    return 100 * correct / total


def _baseline_row(name: str, run: Path, args) -> dict:
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint

    run.mkdir(parents=True, exist_ok=True)
    model = model_from_checkpoint(load_checkpoint(TEACHER)).eval()
    batches = _test_batches(args)
    if name == "fp32":
        path = run / "model_fp32.onnx"
        _fp32_onnx(model, path)
        return {"top1": _top1(model, batches), "top1_source": "PyTorch FP32",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0}
    if name == "fp16":
        # Weights stored in float16; computed in float32 (PyTorch's CPU float16 convolutions
        # took minutes for the test set here, so the row carries no latency).
        path = run / "model_fp16.pt"
        torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        return {"top1": _top1(model, batches), "top1_source": "float16 weights, float32 compute",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0}
    if name == "ao_int8_ptq":
        path = run / "model_int8.pt"
        converted = _ao_int8_ptq(model, args.data_root, path)
        return {"top1": _top1(converted, batches), "top1_source": "PyTorch x86 int8",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0,
                "calibration_images": AO_CALIBRATION_BATCHES * 128}
    raise ValueError(name)


def _fp32_onnx(model: torch.nn.Module, path: Path) -> None:
    """The teacher as FP32 ONNX with a dynamic batch (the FP32 row's file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=True,
                          input_names=["input"], output_names=["logits"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False)


def _ao_int8_ptq(model: torch.nn.Module, data_root, path: Path) -> torch.nn.Module:
    """torch.ao FX static int8 PTQ of `model` (x86, fused), calibrated on the first
    `AO_CALIBRATION_BATCHES` unshuffled training batches (so the same model every time), saved
    as TorchScript to `path`; returns the converted model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from mpq.checkpoint import load_checkpoint
    from mpq.config import DataConfig, recipe_from_dict
    from mpq.data import BatchLoader, load_split

    torch.backends.quantized.engine = "x86"
    cfg = recipe_from_dict(load_checkpoint(TEACHER)["recipe"]["data"], DataConfig)
    train = load_split(cfg, "train", root=data_root, progress=False)
    calib = [x for _, (x, _) in zip(range(AO_CALIBRATION_BATCHES),
                                    BatchLoader(train, cfg, batch_size=128, train=False).epoch(0))]
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepared = prepare_fx(model, get_default_qconfig_mapping("x86"), (calib[0],))
        for x in calib:
            prepared(x)
        converted = convert_fx(prepared)
        torch.jit.save(torch.jit.trace(converted, (calib[0][:2],)), str(path))
    return converted


def _models_to_time(rows: dict, data_root) -> tuple[dict, list]:
    """Each row's model files to time, by runtime ("<row>/onnxruntime", "<row>/pytorch"), and
    the ones rebuilt because their run's folder is gone (a fresh clone keeps only the committed
    artifacts). Rebuilt: the FP32 ONNX from the teacher, torch.ao's int8 model from the same
    calibration batches, each exported row's PyTorch int8 model from its committed `model.mpq`
    (which computes what the exported model computed)."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.errors import UsageError
    from mpq.export.mpqfile import load_mpq
    from mpq.export.torch_int8 import save_torch_int8

    files, rebuilt = {}, []
    for name, row in rows.items():
        if name == "fp16":
            continue
        if name == "fp32":
            path = RUNS / name / "model_fp32.onnx"
            if not path.exists():
                _fp32_onnx(model_from_checkpoint(load_checkpoint(TEACHER)).eval(), path)
                rebuilt.append(f"{name}/onnxruntime")
            files[f"{name}/onnxruntime"] = path
        elif name == "ao_int8_ptq":
            path = RUNS / name / "model_int8.pt"
            if not path.exists():
                try:
                    _ao_int8_ptq(model_from_checkpoint(load_checkpoint(TEACHER)).eval(),
                                 data_root, path)
                except UsageError as exc:  # no calibration data on this machine
                    print(f"  cannot rebuild {name} to time it: {exc}", flush=True)
                    continue
                rebuilt.append(f"{name}/pytorch")
            files[f"{name}/pytorch"] = path
        else:
            export = _in_repo(row["export_dir"])
            if not export.exists():  # a fresh clone: the committed artifacts
                export = ARTIFACTS / name
            if (export / "model_int8.onnx").exists():
                files[f"{name}/onnxruntime"] = export / "model_int8.onnx"
            path, mpq_file = export / "model_int8.pt", export / "model.mpq"
            if not path.exists() and mpq_file.exists():
                path = RUNS / name / "rebuilt" / "model_int8.pt"
                # rebuilt again when the committed model.mpq is newer (a pulled retrained row)
                if not path.exists() or path.stat().st_mtime < mpq_file.stat().st_mtime:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    qmodel, header = load_mpq(mpq_file)
                    size = header["input_size"]
                    save_torch_int8(qmodel, path, input_shape=(3, size, size))
                    rebuilt.append(f"{name}/pytorch")
            if path.exists():
                files[f"{name}/pytorch"] = path
    return files, rebuilt


def latency(rows: dict, threads: int, seconds: float, data_root=None) -> tuple[dict, list]:
    """Milliseconds at batch 1 and 256 of each row's runtimes, measured side by side, and the
    runtimes whose model files had to be rebuilt first (see `_models_to_time`)."""
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint

    torch.set_num_threads(threads)
    torch.backends.quantized.engine = "x86"
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit.load's notice
    files, rebuilt = _models_to_time(rows, data_root)
    if rebuilt:
        print(f"  rebuilt to time them (their runs/results/ files are gone): "
              f"{', '.join(rebuilt)}", flush=True)
    runtimes = {}
    if "fp32" in rows:
        model = model_from_checkpoint(load_checkpoint(TEACHER)).eval()
        model = model.to(memory_format=torch.channels_last)
        runtimes["fp32/pytorch"] = lambda x, m=model: m(
            x.contiguous(memory_format=torch.channels_last))
    for key, path in files.items():
        runtimes[key] = (ort_runner(path, threads) if key.endswith("/onnxruntime")
                         else torch.jit.load(str(path)))
    missing = [name for name in rows if name != "fp16"
               and not any(k.startswith(f"{name}/") for k in runtimes)]
    if missing:
        print(f"  no model to time for {', '.join(missing)}; their latency cells stay empty",
              flush=True)
    out = {}
    for batch in (1, 256):
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            out[str(batch)] = side_by_side(runtimes, x, seconds=seconds)
        print(f"  batch {batch}: " + ", ".join(f"{k} {v:.2f} ms"
                                               for k, v in out[str(batch)].items()), flush=True)
    return out, rebuilt


def write_table(rows: dict, lat: dict, fp32_bytes: int, stale_rows=()) -> str:
    teacher = rows["fp32"]["top1"] if "fp32" in rows else None
    lines = ["| row | top-1 % | lost (points) | stored as | size on disk | compression | "
             "batch 1 | batch 256 | QAT epochs |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, what in ROWS.items():
        if name not in rows:
            continue
        row = rows[name]
        if row.get("infeasible"):
            lines.append(f"| {what} | infeasible | | | budget {row['budget_bytes'] / 1000:.1f} KB"
                         f" < smallest plan {row['smallest_bytes'] / 1000:.1f} KB (all "
                         f"{row['smallest_bits']}-bit) | max "
                         f"{row['smallest_compression']:.2f}x | | | |")
            continue
        best = {}
        for batch in ("1", "256"):
            options = {k.split("/")[1]: v for k, v in lat.get(batch, {}).items()
                       if k.split("/")[0] == name}
            best[batch] = (f"{min(options.values()):.2f} ms ({min(options, key=options.get)})"
                           if options else "")
        lost = f"{teacher - row['top1']:.2f}" if teacher is not None else ""
        if name in stale_rows:
            what += " (stale: rerun benchmarks/results.py)"
        lines.append(f"| {what} | {row['top1']:.2f} | {lost} | {row['file']} | "
                     f"{row['file_bytes'] / 1000:.1f} KB | {fp32_bytes / row['file_bytes']:.2f}x | "
                     f"{best['1']} | {best['256']} | {row['epochs']} |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path = ROOT / "README.md") -> None:
    text = readme.read_text()
    begin, end = "<!-- results:begin -->", "<!-- results:end -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md lacks the {begin} / {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{table}\n{end}{tail}")


def log_curve(rows: dict, fp32_bytes: int) -> None:
    from torch.utils.tensorboard import SummaryWriter

    from mpq.report import scatter_chart

    teacher = rows["fp32"]["top1"]
    # The curve is drawn whole each run: an older run's event file would show every point
    # twice (or a stale one beside its update) in TensorBoard.
    for old in (RUNS / "tb").glob("events.out.tfevents.*"):
        old.unlink()
    writer = SummaryWriter(str(RUNS / "tb"))
    points = []
    for name, row in sorted(rows.items(), key=lambda kv: kv[1]["file_bytes"]):
        if name.startswith(("mpq_", "qat_w", "fp32")):
            kb = row["file_bytes"] / 1000
            writer.add_scalar("accuracy_vs_size/top1", row["top1"], round(kb))
            writer.add_scalar("accuracy_vs_size/points_lost", teacher - row["top1"], round(kb))
            points.append((kb, teacher - row["top1"]))
    writer.add_image("accuracy_vs_size/points_lost_vs_KB",
                     scatter_chart(points, title="ResNet20 / CIFAR-10: points lost vs size",
                                   xlabel="KB on disk", ylabel="points lost"),
                     dataformats="HWC")
    writer.close()


def copy_artifacts(rows: dict, artifacts: Path = ARTIFACTS) -> None:
    """Each exported row's small files into `artifacts/<row>/`; export.json's record of the
    checkpoint it came from made repository-relative, so the committed copy names no machine."""
    for name, row in rows.items():
        if "export_dir" not in row:
            continue
        export = _in_repo(row["export_dir"])
        if not export.exists():
            continue  # a fresh clone: the committed copies are all there is
        target = artifacts / name
        target.mkdir(parents=True, exist_ok=True)
        for file in ARTIFACT_FILES:
            source = export / file if file != "plan.json" else export.parent / "plan.json"
            shutil.copy2(source, target / file)
        report = json.loads((target / "export.json").read_text())
        report["checkpoint"] = _rel(report["checkpoint"])
        (target / "export.json").write_text(json.dumps(report, indent=2) + "\n")


def main() -> None:
    global TEACHER, RESULTS, RUNS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MPQ_DATA"))
    parser.add_argument("--rows", default=",".join(COMPUTE_ORDER),
                        help="comma-separated rows to compute, in this order")
    parser.add_argument("--table-only", action="store_true",
                        help="skip computing rows; measure latency and write the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--teacher", type=Path, default=TEACHER,
                        help="FP32 teacher (default: the committed one)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="trial mode: rows, runs and TensorBoard go under this folder, and "
                             "neither README.md nor checkpoints/ is touched")
    args = parser.parse_args()
    TEACHER = args.teacher.resolve()
    if args.scratch is not None:
        RESULTS, RUNS = args.scratch / "results", args.scratch / "runs"
    if not TEACHER.exists():
        print(f"error: teacher {TEACHER} does not exist; train it first (make run does)",
              file=sys.stderr)
        sys.exit(2)
    wanted = args.rows.split(",")
    unknown = [r for r in wanted if r not in ROWS]
    if unknown:
        print(f"error: unknown rows {unknown}; choose from {', '.join(ROWS)}", file=sys.stderr)
        sys.exit(2)
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in wanted:
        path = RESULTS / f"{name}.json"
        if args.table_only or path.exists():
            continue
        print(f"{name}: {ROWS[name]}", flush=True)
        start = time.time()
        row = make_row(name, args)
        row.update(row=name, what=ROWS[name], wall_seconds=round(time.time() - start, 1))
        path.write_text(json.dumps(row, indent=2) + "\n")
        if not row.get("infeasible"):
            print(f"  top1={row['top1']:.2f} {row['file']} {row['file_bytes']} bytes "
                  f"({row['wall_seconds']:.0f} s)", flush=True)
    rows = {name: json.loads((RESULTS / f"{name}.json").read_text())
            for name in ROWS if (RESULTS / f"{name}.json").exists()}
    stale_rows = {name: reason for name, row in rows.items() if (reason := stale(name, row))}
    for name, reason in stale_rows.items():
        print(f"{name}: stale, marked so in the table: {reason}; to redo it, delete "
              f"{_rel(RESULTS / f'{name}.json')} and move {_rel(RUNS / name)} aside", flush=True)
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.size import fp32_parameter_bytes

    fp32_bytes = fp32_parameter_bytes(model_from_checkpoint(load_checkpoint(TEACHER)))
    print("latency, side by side:", flush=True)
    measured = {name: row for name, row in rows.items() if not row.get("infeasible")}
    lat, rebuilt = latency(measured, args.threads, args.seconds, args.data_root)
    (RESULTS / "latency.json").write_text(json.dumps(
        {"threads": args.threads, "ms": lat, "torch": torch.__version__,
         "rebuilt": rebuilt}, indent=2) + "\n")
    table = write_table(rows, lat, fp32_bytes, stale_rows)
    if "fp32" in rows:
        log_curve(measured, fp32_bytes)
    if args.scratch is None:
        update_readme(table)
        copy_artifacts(measured)
        w4 = RUNS / "qat_w4" / "qat" / "model.pt"
        if w4.exists():
            shutil.copy2(w4, ROOT / "checkpoints" / "resnet20_cifar10_w4a8.pt")
    print(table)


if __name__ == "__main__":
    main()
