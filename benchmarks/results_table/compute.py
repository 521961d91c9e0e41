"""Computing one row: the commands a user would run (recorded in the row), or for the
baselines the teacher evaluated in float32 / float16 and torch.ao's int8 PTQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from mpq.files import atomic_path
from .inflight import kept_checkpoint
from .layout import (ABLATION_PLAN, ABLATION_PLANS, ABLATIONS, AO_CALIBRATION_BATCHES,
                     BOPS_ROWS, FORK_ROWS, MAKE_RUN_VARIANTS, PINNED_FP32, QAT_EPOCHS,
                     QAT_RECIPE, ROW_SETTINGS, SEARCH_RECIPE, WARM_ROWS, Layout)

__all__ = ["RowFailed", "epoch_curve", "make_row", "seed_fork", "smallest_plan", "stale",
           "stop_commands_on_sigterm"]


class RowFailed(RuntimeError):
    """One of a row's commands failed; its log says why."""


def stop_commands_on_sigterm() -> None:
    """Makes SIGTERM (`kill PID`) end this process as Ctrl-C does, by an exception, so that
    `_run`'s `subprocess.call` kills the command it waits on rather than leaving it to train on
    alone (a row stopped so resumes from its last checkpoint)."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def _run(layout: Layout, cmd: list, log: Path) -> None:
    """Runs one of the user's commands, its output appended to `log`; raises on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    printable = layout.printable(cmd)
    print(f"  $ {printable}", flush=True)
    env = {**os.environ, "PYTHONPATH": str(layout.root)}
    with open(log, "a") as fh:
        fh.write(f"\n$ {printable}\n")
        fh.flush()
        code = subprocess.call([sys.executable, *map(str, cmd)], cwd=layout.root, env=env,
                               stdout=fh, stderr=subprocess.STDOUT)
    if code:
        raise RowFailed(f"command failed with exit code {code} (log: {log}): {printable}")


def epoch_curve(qat_dir: Path) -> list[float]:
    """The test top-1 after each epoch of a QAT run (from its `checkpoint_last.pt`), so a row's
    curve stays with the row once `runs/` is gone; [] where the checkpoint is not there."""
    from mpq.checkpoint import load_checkpoint

    last = qat_dir / "checkpoint_last.pt"
    if not last.is_file():
        return []
    return [round(float(h["test_top1"]), 2) for h in load_checkpoint(last)["history"]]


def _exported_row(layout: Layout, commands: list[list], export_dir: Path, log: Path) -> dict:
    for cmd in commands:
        _run(layout, cmd, log)
    report = json.loads((export_dir / "export.json").read_text())
    metrics = json.loads((export_dir.parent / "metrics.json").read_text())
    before = (metrics.get("init") or {}).get("epochs", 0)  # a warm start's earlier epochs
    return {"top1": report["onnx_top1"], "top1_source": "model_int8.onnx in ONNX Runtime",
            "file": "model.mpq", "file_bytes": report["mpq_bytes"],
            "onnx_bytes": report["files"]["model_int8.onnx"]["bytes"],
            "fake_quant_top1": report["fake_quant_top1"],
            "torch_int8_top1": report["torch_int8_top1"], "epochs": metrics["epochs"] + before,
            **({"init_epochs": before, "init_top1": metrics["init"]["top1"]} if before else {}),
            "train_seconds": metrics.get("train_seconds"), "export_dir": layout.rel(export_dir),
            "commands": [layout.printable(c) for c in commands],
            "test_top1_by_epoch": epoch_curve(export_dir.parent),
            **{key: metrics[key] for key in ("frozen_fraction", "live_top1",
                                             "top1_before_bn_reestimate") if key in metrics}}


def make_row(layout: Layout, name: str, *, data_root=None) -> dict:
    """Computes row `name` (its runs under `layout.runs / name`)."""
    run = layout.runs / name
    log = run / "log.txt"
    data = ["--data-root", data_root] if data_root else []
    qat = ["train.py", "--recipe", QAT_RECIPE, "--teacher", layout.teacher, *data, "--quiet"]
    if name in QAT_EPOCHS:
        qat += ["--set", f"train.epochs={QAT_EPOCHS[name]}"]
    if name in PINNED_FP32:  # resumed on other machines: the same precision on every CPU
        qat += ["--set", "train.precision=fp32"]
    if name in ABLATIONS:
        sets = [arg for setting in ABLATIONS[name][1] for arg in ("--set", setting)]
        plan = layout.root / ABLATION_PLANS.get(name, ABLATION_PLAN)
        return _exported_row(layout, [[*qat, "--plan", plan, *sets,
                                       "--out", run / "qat"]], run / "qat" / "export", log)
    if name == "make_run" or name in MAKE_RUN_VARIANTS:
        # The Makefile's two commands, precision pinned so the row means the same on every CPU.
        sets = [arg for setting in MAKE_RUN_VARIANTS.get(name, ("", []))[1]
                for arg in ("--set", setting)]
        search = ["search.py", "--recipe", SEARCH_RECIPE, "--checkpoint", layout.teacher, *data,
                  "--budget", "13x", *sets, "--out", run / "search", "--quiet"]
        train = [*qat, "--plan", run / "search" / "plan.json", "--set", "train.precision=fp32",
                 "--out", run / "qat"]
        row = _exported_row(layout, [search, train], run / "qat" / "export", log)
        plan = json.loads((run / "search" / "plan.json").read_text())
        row.update(budget_bytes=plan["budget_bytes"], plan_size_bytes=plan["size_bytes"])
        return row
    if name in BOPS_ROWS:
        budget, bops, a_choices = BOPS_ROWS[name]
        widths = json.dumps(a_choices, separators=(",", ":"))  # one shell word: [4,8]
        search = ["search.py", "--recipe", SEARCH_RECIPE, "--checkpoint", layout.teacher, *data,
                  "--budget", budget, "--bops", bops, "--set", f"search.a_bit_choices={widths}",
                  "--out", run / "search", "--quiet"]
        train = [*qat, "--plan", run / "search" / "plan.json", "--set", "train.precision=fp32",
                 "--out", run / "qat"]
        row = _exported_row(layout, [search, train], run / "qat" / "export", log)
        plan = json.loads((run / "search" / "plan.json").read_text())
        row.update(budget_bytes=plan["budget_bytes"], plan_size_bytes=plan["size_bytes"],
                   bops=plan["bops"], fp32_bops=plan["fp32_bops"], bops_budget=plan["bops_budget"])
        return row
    if name in WARM_ROWS:
        base, _ = WARM_ROWS[name]
        init = layout.runs / base / "qat" / "model.pt"
        # The run it starts from is needed only to start (a parked row resumes without it).
        if not init.is_file() and not (run / "qat" / "checkpoint_last.pt").is_file():
            make_row(layout, base, data_root=data_root)
        bits = base.split("_")[1][1:]
        row = _exported_row(layout, [[*qat, "--bits", bits, "--init", init, "--out", run / "qat"]],
                            run / "qat" / "export", log)
        return {**row, "init_row": base}
    if name in PLAN_ROWS:
        plan = PLAN_ROWS[name](layout, run / "plan.json")
        return _exported_row(layout, [[*qat, "--plan", plan, "--set", "train.precision=fp32",
                                       "--out", run / "qat"]], run / "qat" / "export", log)
    if name in ("ptq_w4", "ptq_w2"):
        return _exported_row(layout, [[*qat, "--bits", name[-1], "--ptq", "--out", run / "qat"]],
                             run / "qat" / "export", log)
    if name.startswith("qat_w"):  # qat_w<bits>[_<epochs>ep]
        bits = name.split("_")[1][1:]
        sets = [arg for setting in ROW_SETTINGS.get(name, []) for arg in ("--set", setting)]
        forks = {fork: epochs for fork, (_, parent, epochs, _) in FORK_ROWS.items()
                 if parent == name}
        keep = [arg for epochs in sorted(set(forks.values()))
                for arg in ("--keep-epoch", epochs)]
        if name in FORK_ROWS:
            seed_fork(layout, name)
        row = _exported_row(layout, [[*qat, "--bits", bits, *sets, *keep, "--out", run / "qat"]],
                            run / "qat" / "export", log)
        for fork, epochs in forks.items():  # while this run's kept checkpoints are here
            if (not (layout.results / f"{fork}.json").exists()
                    and kept_checkpoint(layout, name, epochs)):
                seed_fork(layout, fork)
        if name in FORK_ROWS:
            _, parent, epochs, settings = FORK_ROWS[name]
            row["forked_from"] = {"row": parent, "epochs": epochs, "settings": settings}
        return row
    if name.startswith("mpq_"):
        budget = name.split("_")[1]
        floor = smallest_plan(layout, budget)
        if floor is not None:
            return floor
        # The committed rows were searched, and trained for hours, on plans of the repair
        # that was the default then; this keeps their commands making those plans.
        search = ["search.py", "--recipe", SEARCH_RECIPE, "--checkpoint", layout.teacher, *data,
                  "--budget", budget, "--out", run / "search", "--quiet",
                  "--set", "search.repair=perturbation"]
        train = [*qat, "--plan", run / "search" / "plan.json", "--out", run / "qat"]
        row = _exported_row(layout, [search, train], run / "qat" / "export", log)
        plan = json.loads((run / "search" / "plan.json").read_text())
        row.update(budget_bytes=plan["budget_bytes"], plan_size_bytes=plan["size_bytes"])
        return row
    return _baseline_row(layout, name, run, data_root)


def seed_fork(layout: Layout, name: str) -> None:
    """Starts fork row `name`'s QAT run as its parent's run after the fork's epoch, with the
    fork's settings written into the stored recipe (so `train.py` resumes it as the fork's own
    run); nothing where the fork's run has a checkpoint already."""
    import yaml

    from mpq.checkpoint import load_checkpoint, save_checkpoint
    from mpq.config import apply_overrides, recipe_from_dict, recipe_to_dict
    from mpq.files import write_atomic
    from mpq.qat import QATRecipe
    from mpq.trainer import LAST

    _, parent, epochs, settings = FORK_ROWS[name]
    target = layout.runs / name / "qat" / LAST
    if target.is_file():
        return
    kept = kept_checkpoint(layout, parent, epochs)
    if kept is None:
        raise RowFailed(f"{name} forks {parent} after epoch {epochs}, whose checkpoint there "
                        f"is neither in its run folder nor parked: run that row past epoch "
                        f"{epochs} first (benchmarks/results.py --rows {parent})")
    state = load_checkpoint(kept)
    state["recipe"] = recipe_to_dict(recipe_from_dict(
        apply_overrides(state["recipe"], settings), QATRecipe))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target.parent / "recipe.yaml", yaml.safe_dump(state["recipe"], sort_keys=False))
    save_checkpoint(target, state)


def w4a4_plan(layout: Layout, path: Path) -> Path:
    """Writes the uniform W4A4 plan to `path`: 4-bit weights, 4-bit activations entering every
    layer but the first, whose input is the image (8 bits, as HAWQ and most A4 work keep it)."""
    return _uniform_plan(layout, path, w_bits=4, a_bits=4, first={"a_bits": 8})


def w2_first_last_8_plan(layout: Layout, path: Path) -> Path:
    """Writes uniform ternary with the first conv and the classifier at 8-bit weights to `path`
    (TTQ's and LQ-Nets' ternary ResNet20 keep both in full precision)."""
    return _uniform_plan(layout, path, w_bits=2, a_bits=8, first={"w_bits": 8},
                         last={"w_bits": 8})


def _uniform_plan(layout: Layout, path: Path, *, w_bits: int, a_bits: int, first=None,
                  last=None) -> Path:
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.quant import quantizable_layers, uniform_plan

    teacher = model_from_checkpoint(load_checkpoint(layout.teacher))
    names = quantizable_layers(teacher)
    plan = uniform_plan("resnet20", names, w_bits=w_bits, a_bits=a_bits)
    plan.layers[names[0]].update(first or {})
    plan.layers[names[-1]].update(last or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    plan.save(path)
    return path


# Rows trained on a fixed plan written by these functions.
PLAN_ROWS = {"qat_w4a4": w4a4_plan, "qat_w2_fl8": w2_first_last_8_plan,
             "qat_w2_fl8_30ep": w2_first_last_8_plan}


def smallest_plan(layout: Layout, budget: str) -> dict | None:
    """None when the search recipe can meet `budget`; else the row saying it cannot (every layer
    at the fewest bits still makes a larger file), with the smallest plan's size."""
    from mpq.allocate import parse_budget
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.config import load_recipe
    from mpq.search import SearchRecipe
    from mpq.search_budgets import plan_floor
    from mpq.size import fp32_parameter_bytes

    recipe = load_recipe(layout.root / SEARCH_RECIPE, [], cls=SearchRecipe)
    model = model_from_checkpoint(load_checkpoint(layout.teacher)).eval()
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


def stale(layout: Layout, name: str, row: dict) -> str | None:
    """Why a finished mpq row no longer stands for what its commands make now, or None.

    Its search sized the plan in the `model.mpq` format of its day: when the file it exported
    weighs something else, the format changed since, and the search would now pick another
    plan at the same budget. When the search under `layout.runs` was run again and picked other
    bits than the plan the row was trained on (its export's, or on a fresh clone its committed
    copy), the row is stale too."""
    if row.get("infeasible") or "plan_size_bytes" not in row:
        return None
    if row["file_bytes"] != row["plan_size_bytes"]:
        return (f"its search sized the plan at {row['plan_size_bytes']} bytes but its model.mpq "
                f"is {row['file_bytes']} bytes: the file format changed after the search")
    searched = layout.runs / name / "search" / "plan.json"
    trained = (layout.in_repo(row["export_dir"]).parent / "plan.json"
               if "export_dir" in row else None)
    if trained is None or not trained.is_file():
        trained = layout.artifacts / name / "plan.json"
    if searched.is_file() and trained.is_file():
        bits = [{k: (v["w_bits"], v.get("a_bits")) for k, v in
                 json.loads(f.read_text())["layers"].items()} for f in (searched, trained)]
        if bits[0] != bits[1]:
            return (f"the search in {layout.rel(searched)} now picks other bits than the row's "
                    f"plan {layout.rel(trained)}")
    return None


@torch.no_grad()
def _top1(fn, batches) -> float:
    correct = total = 0
    for x, y in batches:
        correct += int((fn(x).argmax(1) == y).sum())
        total += len(y)
    return 100 * correct / total


def _baseline_row(layout: Layout, name: str, run: Path, data_root) -> dict:
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.export.run import test_batches_for

    run.mkdir(parents=True, exist_ok=True)
    payload = load_checkpoint(layout.teacher)
    model = model_from_checkpoint(payload).eval()
    batches = test_batches_for(payload, data_root=data_root, progress=False)
    if name == "fp32":
        path = run / "model_fp32.onnx"
        fp32_onnx(model, path)
        return {"top1": _top1(model, batches), "top1_source": "PyTorch FP32",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0}
    if name == "fp16":
        # Weights stored in float16, computed in float32 (PyTorch's CPU float16 convolutions
        # take minutes for the test set, so the row carries no latency).
        path = run / "model_fp16.pt"
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            torch.save({k: v.half() for k, v in model.state_dict().items()}, fh)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.half().float())
        return {"top1": _top1(model, batches), "top1_source": "float16 weights, float32 compute",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0}
    if name == "ao_int8_ptq":
        path = run / "model_int8.pt"
        converted = ao_int8_ptq(layout, model, data_root, path)
        return {"top1": _top1(converted, batches), "top1_source": "PyTorch x86 int8",
                "file": path.name, "file_bytes": path.stat().st_size, "epochs": 0,
                "calibration_images": AO_CALIBRATION_BATCHES * 128}
    raise ValueError(name)


def fp32_onnx(model: torch.nn.Module, path: Path) -> None:
    """The teacher as FP32 ONNX with a dynamic batch (the FP32 row's file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, 32, 32),), str(path), dynamo=True,
                          input_names=["input"], output_names=["logits"], verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch")},),
                          external_data=False)


def ao_int8_ptq(layout: Layout, model: torch.nn.Module, data_root,
                path: Path) -> torch.nn.Module:
    """torch.ao FX static int8 PTQ of `model` (x86, fused), calibrated on the first
    `AO_CALIBRATION_BATCHES` unshuffled training batches (so the same model every time), saved
    as TorchScript to `path`; returns the converted model."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    from mpq.checkpoint import load_checkpoint
    from mpq.config import DataConfig, recipe_from_dict
    from mpq.data import BatchLoader, load_split

    torch.backends.quantized.engine = "x86"
    cfg = recipe_from_dict(load_checkpoint(layout.teacher)["recipe"]["data"], DataConfig)
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
        with atomic_path(path) as tmp:
            torch.jit.save(torch.jit.trace(converted, (calib[0][:2],)), str(tmp))
    return converted
