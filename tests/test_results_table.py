"""The results table (`benchmarks/results_table`, run by benchmarks/results.py): rows in the table's order,
points lost against the FP32 row, compression against FP32 parameter bytes, each row's fastest
runtime; the README block between the markers replaced and nothing else."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import ROOT
from mpq.errors import UsageError

sys.path.insert(0, str(ROOT / "benchmarks"))
import results_table as results  # noqa: E402  (the table's logic lives beside its command)
from results_table.latency import _models_to_time, runtime_ranges  # noqa: E402

LAYOUT = results.Layout.of(ROOT)


def row(top1, file, size, epochs=0):
    return {"top1": top1, "file": file, "file_bytes": size, "epochs": epochs}


def test_table_rows_losses_compression_and_fastest_runtime():
    rows = {"mpq_13x": row(88.9, "model.mpq", 80_000, 10),
            "fp32": row(89.2, "fp32.onnx", 1_100_000)}
    latency = {"1": {"fp32/pytorch": 1.5, "fp32/onnxruntime": 0.4, "mpq_13x/onnxruntime": 0.2,
                     "mpq_13x/pytorch": 0.5},
               "256": {"fp32/pytorch": 170.0, "fp32/onnxruntime": 96.0,
                       "mpq_13x/onnxruntime": 42.0, "mpq_13x/pytorch": 34.0}}
    lines = results.write_table(rows, latency, fp32_bytes=1_089_896).splitlines()
    assert lines[2].startswith("| FP32 teacher | 89.20 | 0.00 |")  # table order, not dict order
    mpq = lines[3]
    assert "| 88.90 | 0.30 | model.mpq | 80.0 KB | 13.62x |" in mpq
    assert "0.20 ms (onnxruntime) | 34.00 ms (pytorch) | 10 |" in mpq


def test_readme_block_is_replaced_between_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\nafter\n")
    results.update_readme("| new |", readme)
    assert readme.read_text() == ("intro\n<!-- results:begin -->\n| new |\n"
                                  "<!-- results:end -->\nafter\n")
    assert results.COMPUTE_ORDER and sorted(results.COMPUTE_ORDER) == sorted(results.ROWS)


def test_rows_record_paths_relative_to_the_repository(tmp_path):
    inside = LAYOUT.root / "runs" / "results" / "mpq_13x" / "qat" / "export"
    assert LAYOUT.rel(inside) == "runs/results/mpq_13x/qat/export"
    assert LAYOUT.in_repo("runs/results/x") == LAYOUT.root / "runs" / "results" / "x"
    assert LAYOUT.in_repo(str(tmp_path)) == tmp_path  # older rows: absolute paths stay
    cmd = ["train.py", "--teacher", LAYOUT.root / "checkpoints" / "t.pt", "--data-root",
           str(tmp_path), "--out", tmp_path / "out"]
    assert LAYOUT.printable(cmd) == (f"train.py --teacher checkpoints/t.pt --data-root "
                                     f"{tmp_path} --out {tmp_path / 'out'}")


def test_committed_export_report_names_its_checkpoint_relative_to_the_repository(tmp_path):
    export = tmp_path / "qat" / "export"
    export.mkdir(parents=True)
    (tmp_path / "qat" / "plan.json").write_text("{}")
    for file in ("model.mpq", "model_int8.onnx"):
        (export / file).write_bytes(b"x")
    checkpoint = LAYOUT.root / "runs" / "results" / "mpq_8x" / "qat" / "model.pt"
    (export / "export.json").write_text(json.dumps({"checkpoint": str(checkpoint),
                                                    "onnx_top1": 89.41}))
    results.copy_artifacts(dataclasses.replace(LAYOUT, artifacts=tmp_path / "committed"),
                           {"mpq_8x": {"export_dir": str(export)}, "fp32": {"top1": 89.57}})
    copied = json.loads((tmp_path / "committed" / "mpq_8x" / "export.json").read_text())
    assert copied == {"checkpoint": "runs/results/mpq_8x/qat/model.pt", "onnx_top1": 89.41}
    assert json.loads((export / "export.json").read_text())["checkpoint"] == str(checkpoint)
    assert sorted(p.name for p in (tmp_path / "committed").iterdir()) == ["mpq_8x"]


def test_a_budget_below_the_smallest_plan_is_a_row_saying_so_not_a_crash():
    if not LAYOUT.teacher.exists():
        pytest.skip(f"needs the committed teacher {LAYOUT.teacher}")
    assert results.smallest_plan(LAYOUT, "13x") is None
    assert results.smallest_plan(LAYOUT, "16x") is None
    row20 = results.smallest_plan(LAYOUT, "20x")
    assert row20["infeasible"] and row20["smallest_bytes"] > row20["budget_bytes"]
    # ResNet20's 270,896 weights at 2 bits (1.6 each: 54,180 bytes, plus each of the 22 layers
    # rounding up to whole bytes) fit the 20x budget; its 794 channels' scales and biases do not
    assert row20["smallest_weight_bytes"] == 54_188 < row20["budget_bytes"]
    assert row20["smallest_bits"] == 2 and 17 < row20["smallest_compression"] < 18
    # the table's formatting of such a row (under a row name the table knows)
    rows = {"fp32": row(89.2, "fp32.onnx", 1_100_000), "mpq_16x": row20}
    lines = results.write_table(rows, {}, fp32_bytes=1_089_896).splitlines()
    assert lines[-1].startswith("| mpq, 16x budget | infeasible |")
    assert f"max {row20['smallest_compression']:.2f}x" in lines[-1]


def _plan(bits: dict) -> str:
    return json.dumps({"layers": {name: {"w_bits": b, "a_bits": 8} for name, b in bits.items()}})


def test_an_mpq_row_sized_in_another_file_format_or_searched_anew_is_stale(tmp_path):
    current = {**row(89.4, "model.mpq", 133_305, 10), "plan_size_bytes": 133_305}
    runs, committed = tmp_path / "runs", tmp_path / "committed"
    layout = dataclasses.replace(LAYOUT, runs=runs, artifacts=committed)
    assert results.stale(layout, "mpq_8x", current) is None
    assert results.stale(layout, "fp32", row(89.57, "fp32.onnx", 1_171_834)) is None
    # the 8x row of session 5: planned at 136,164 bytes by version 1's sizes, stored as version 2
    old_format = {**current, "plan_size_bytes": 136_164}
    assert "format changed" in results.stale(layout, "mpq_8x", old_format)
    (committed / "mpq_8x").mkdir(parents=True)
    (committed / "mpq_8x" / "plan.json").write_text(_plan({"conv1": 8, "fc": 4}))
    (runs / "mpq_8x" / "search").mkdir(parents=True)
    searched = runs / "mpq_8x" / "search" / "plan.json"
    searched.write_text(_plan({"conv1": 8, "fc": 4}))
    assert results.stale(layout, "mpq_8x", current) is None
    searched.write_text(_plan({"conv1": 7, "fc": 4}))
    assert "other bits" in results.stale(layout, "mpq_8x", current)
    # a row just trained on the new plan: its own run's plan counts, not the committed copy
    # that copy_artifacts has yet to replace
    (runs / "mpq_8x" / "qat" / "export").mkdir(parents=True)
    (runs / "mpq_8x" / "qat" / "plan.json").write_text(_plan({"conv1": 7, "fc": 4}))
    retrained = {**current, "export_dir": str(runs / "mpq_8x" / "qat" / "export")}
    assert results.stale(layout, "mpq_8x", retrained) is None
    searched.write_text(_plan({"conv1": 8, "fc": 4}))
    assert "other bits" in results.stale(layout, "mpq_8x", retrained)
    lines = results.write_table({"mpq_8x": retrained}, {}, fp32_bytes=1_089_896,
                                stale_rows={"mpq_8x"}).splitlines()
    assert lines[-1].startswith("| mpq, 8x budget (stale: rerun benchmarks/results.py) | 89.40 |")


def test_every_committed_mpq_row_is_what_its_plan_and_the_current_format_make(tmp_path):
    """A committed mpq row stands for its commands only while the file format its search sized
    the plan in is the one its model.mpq is stored in, and that file holds the plan's bits."""
    from mpq.export.mpqfile import MPQ_VERSION, read_mpq

    committed = sorted(LAYOUT.results.glob("mpq_*.json"))
    if not committed:
        pytest.skip("no mpq row committed yet (benchmarks/results.py)")
    for path in committed:
        name, record = path.stem, json.loads(path.read_text())
        if record.get("infeasible"):
            continue
        assert results.stale(dataclasses.replace(LAYOUT, runs=tmp_path), name, record) is None
        folder = LAYOUT.artifacts / name
        plan = json.loads((folder / "plan.json").read_text())
        header, _, version = read_mpq(folder / "model.mpq")
        assert version == MPQ_VERSION, name
        assert header["w_bits"] == "".join(str(v["w_bits"]) for v in plan["layers"].values())
        assert (folder / "model.mpq").stat().st_size == plan["size_bytes"] == record["file_bytes"]


def test_a_fresh_clone_times_every_row_from_what_it_committed(tmp_path):
    """With runs/results/ gone, latency still times FP32 in ONNX Runtime (rebuilt from the
    teacher) and an exported row in PyTorch int8 (rebuilt from its committed model.mpq, computing
    what its committed ONNX model computes); nothing is rebuilt twice."""
    import numpy as np
    import onnxruntime as ort

    committed = LAYOUT.artifacts / "qat_w4"
    if not (LAYOUT.teacher.exists() and (committed / "model.mpq").exists()):
        pytest.skip("needs the committed teacher and qat_w4 artifacts")
    artifacts = tmp_path / "artifacts"
    shutil.copytree(committed, artifacts / "qat_w4")
    layout = dataclasses.replace(LAYOUT, artifacts=artifacts, runs=tmp_path / "runs")
    rows = {"fp32": {}, "fp16": {}, "qat_w4": {"export_dir": "runs/results/gone/export"}}
    files, rebuilt = _models_to_time(layout, rows, data_root=None)
    assert sorted(rebuilt) == ["fp32/onnxruntime", "qat_w4/pytorch"]
    assert sorted(files) == ["fp32/onnxruntime", "qat_w4/onnxruntime", "qat_w4/pytorch"]
    assert files["qat_w4/onnxruntime"] == artifacts / "qat_w4" / "model_int8.onnx"
    x = torch.randn(64, 3, 32, 32)
    onnx_logits = ort.InferenceSession(str(files["qat_w4/onnxruntime"])).run(
        None, {"input": x.numpy()})[0]
    torch_logits = torch.jit.load(str(files["qat_w4/pytorch"]))(x).numpy()
    assert (onnx_logits.argmax(1) == torch_logits.argmax(1)).mean() >= 0.95
    assert np.abs(onnx_logits - torch_logits).max() < 0.1 * np.abs(onnx_logits).max()
    assert _models_to_time(layout, rows, data_root=None)[1] == []
    later = files["qat_w4/pytorch"].stat().st_mtime + 10  # a retrained row's file, pulled
    os.utime(artifacts / "qat_w4" / "model.mpq", (later, later))
    assert _models_to_time(layout, rows, data_root=None)[1] == ["qat_w4/pytorch"]


def test_the_accuracy_vs_size_curve_is_drawn_once_however_often_it_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layout = dataclasses.replace(LAYOUT, runs=tmp_path)
    rows = {"fp32": row(89.57, "model_fp32.onnx", 1_171_834),
            "mpq_13x": row(89.37, "model.mpq", 83_799, epochs=60)}
    results.log_curve(layout, rows)
    rows["mpq_13x"] = row(89.40, "model.mpq", 83_799, epochs=60)
    results.log_curve(layout, rows)
    assert len(list((tmp_path / "tb").glob("events.out.tfevents.*"))) == 1
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    top1 = [e.value for e in events.Scalars("accuracy_vs_size/top1")]
    assert top1 == pytest.approx([89.40, 89.57])


def test_only_publish_writes_the_readme(tmp_path):
    if not LAYOUT.teacher.exists():
        pytest.skip(f"needs the committed teacher {LAYOUT.teacher}")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- results:begin -->\nold\n<!-- results:end -->\n")
    layout = dataclasses.replace(LAYOUT, root=tmp_path, results=tmp_path / "results",
                                 runs=tmp_path / "runs", artifacts=tmp_path / "artifacts")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "fp16.json").write_text(json.dumps(row(89.5, "model_fp16.pt",
                                                                  545_000)))
    table = results.run(layout, [], table_only=True, seconds=0.1)
    assert "| FP16 weights (float32 compute) | 89.50 |" in table
    assert "old" in readme.read_text()
    assert results.run(layout, [], table_only=True, seconds=0.1, publish=True) == table
    assert table in readme.read_text() and "old" not in readme.read_text()
    with pytest.raises(UsageError, match="unknown rows"):
        results.run(layout, ["fp64"])
    # rows only: nothing timed, no table, no latency file
    (tmp_path / "results" / "latency.json").unlink()
    assert results.run(layout, [], table=False) == ""
    assert not (tmp_path / "results" / "latency.json").exists()


def test_an_mpq_row_searches_with_the_repair_its_committed_plan_was_found_with(tmp_path,
                                                                               monkeypatch):
    """The committed rows' plans came from the `perturbation` repair (the default until the
    search moved to `undo`): their commands must still make those plans."""
    from results_table import compute

    ran = []

    def fake_row(layout, commands, export_dir, log):
        ran.extend(commands)
        plan = layout.runs / "mpq_13x" / "search" / "plan.json"
        plan.parent.mkdir(parents=True)
        plan.write_text(json.dumps({"budget_bytes": 1, "size_bytes": 1}))
        return {}

    monkeypatch.setattr(compute, "_exported_row", fake_row)
    compute.make_row(dataclasses.replace(LAYOUT, runs=tmp_path), "mpq_13x")
    search = [str(a) for a in ran[0]]
    assert search[0] == "search.py" and "search.repair=perturbation" in search
    assert search[search.index("search.repair=perturbation") - 1] == "--set"


def test_an_ablation_row_trains_the_committed_13x_plan_with_its_one_change(tmp_path,
                                                                          monkeypatch):
    from results_table import compute

    ran = []
    monkeypatch.setattr(compute, "_exported_row",
                        lambda layout, commands, export_dir, log: ran.extend(commands) or {})
    compute.make_row(dataclasses.replace(LAYOUT, runs=tmp_path), "abl13_lsq")
    (train,) = [[str(a) for a in cmd] for cmd in ran]
    assert train[0] == "train.py" and "--bits" not in train
    assert train[train.index("--plan") + 1] == str(ROOT / results.layout.ABLATION_PLAN)
    sets = [train[i + 1] for i, a in enumerate(train) if a == "--set"]
    assert sets == ["train.precision=fp32", "qat.weight_scale=lsq"]  # no epochs: the recipe's
    assert (ROOT / results.layout.ABLATION_PLAN).is_file()
    ran.clear()  # an ablation of another committed plan trains that plan
    compute.make_row(dataclasses.replace(LAYOUT, runs=tmp_path), "abl16_hold")
    (train,) = [[str(a) for a in cmd] for cmd in ran]
    assert train[train.index("--plan") + 1] == str(ROOT / "checkpoints/resnet20_cifar10/mpq_16x"
                                                          "/plan.json")
    assert all((ROOT / plan).is_file() for plan in results.layout.ABLATION_PLANS.values())


def test_points_lost_against_epochs_are_drawn_beside_the_size_curve(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layout = dataclasses.replace(LAYOUT, runs=tmp_path)
    rows = {"fp32": row(89.57, "model_fp32.onnx", 1_171_834),
            "abl13_ep1": row(88.50, "model.mpq", 83_799, epochs=1),
            "abl13_fp32": row(89.07, "model.mpq", 83_799, epochs=10),
            "abl13_bf16": row(89.36, "model.mpq", 83_799, epochs=10),
            "mpq_13x": row(89.37, "model.mpq", 83_799, epochs=60),
            "qat_w2": row(87.85, "model.mpq", 60_966, epochs=10),
            "qat_w2_30ep": row(88.44, "model.mpq", 60_966, epochs=30),
            "qat_w2_warm60": row(88.70, "model.mpq", 60_966, epochs=60),
            "qat_w2_fl8": row(88.31, "model.mpq", 61_823, epochs=10)}
    assert results.table.epoch_points(rows) == {
        "13x plan, float32, seed 0": [(1, 1.07, "abl13_ep1"), (10, 0.5, "abl13_fp32")],
        "13x plan: bf16 (3 draws) / seeds 1-3 / 60 epochs (each seed)": [
            (10, 0.21, "abl13_bf16"), (60, 0.2, "mpq_13x")],
        "13x plan, moving average (0.5 epoch)": [],
        "16x plan": [], "16x plan, ratios held for the last 30%": [],
        "uniform ternary W2A8": [(10, 1.72, "qat_w2"), (30, 1.13, "qat_w2_30ep")],
        "ternary, 30 + 30 warm restart": [(60, 0.87, "qat_w2_warm60")],
        "uniform ternary, 60 epochs, seeds 1 and 2": [],
        "uniform ternary, 60 epochs, ratios held for the last 30%": [],
        "ternary, conv1 and FC at 8 bits": [(10, 1.26, "qat_w2_fl8")],
        "ternary, LSQ weight scales": []}
    results.log_curve(layout, rows)
    png = tmp_path / "figures" / "epochs.png"
    results.log_epochs(layout, rows, png=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    lost = events.Scalars("epochs_13x/points_lost")
    assert [(e.step, round(e.value, 2)) for e in lost] == [(1, 1.07), (10, 0.5)]
    ternary = events.Scalars("epochs_w2/points_lost")
    assert [(e.step, round(e.value, 2)) for e in ternary] == [(10, 1.72), (30, 1.13)]
    ends_8 = events.Scalars("epochs_w2_fl8/points_lost")
    assert [(e.step, round(e.value, 2)) for e in ends_8] == [(10, 1.26)]
    assert "epochs_16x/points_lost" not in events.Tags()["scalars"]  # no finished row yet
    assert "epochs/points_lost_vs_epochs" in events.Tags()["images"]
    assert len(events.Scalars("accuracy_vs_size/top1")) == 6  # fp32, mpq_13x, qat_w2 (3), fl8


def _commands_of(tmp_path, monkeypatch, name: str) -> list[list[str]]:
    """The commands row `name` runs (nothing run), its search's plan.json faked."""
    from results_table import compute

    ran = []
    monkeypatch.setattr(compute, "_exported_row",
                        lambda layout, commands, export_dir, log: ran.extend(commands) or {})
    (tmp_path / name / "search").mkdir(parents=True, exist_ok=True)
    (tmp_path / name / "search" / "plan.json").write_text(
        json.dumps({"budget_bytes": 83_838, "size_bytes": 83_799}))
    compute.make_row(dataclasses.replace(LAYOUT, runs=tmp_path), name)
    return [[str(a) for a in cmd] for cmd in ran]


def test_the_make_run_row_runs_the_makefiles_search_and_qat_with_precision_pinned(tmp_path,
                                                                                 monkeypatch):
    search, train = _commands_of(tmp_path, monkeypatch, "make_run")
    makefile = (ROOT / "Makefile").read_text()
    assert "search.py --recipe recipes/resnet20_cifar10.yaml" in makefile
    assert search[:3] == ["search.py", "--recipe", "recipes/resnet20_cifar10.yaml"]
    assert "--set" not in search and search[search.index("--budget") + 1] == "13x"
    assert train[train.index("--plan") + 1] == str(tmp_path / "make_run" / "search" / "plan.json")
    assert [train[i + 1] for i, a in enumerate(train) if a == "--set"] == ["train.precision=fp32"]


def test_the_60_epoch_make_run_row_is_the_makefiles_commands_with_epochs_60(tmp_path,
                                                                           monkeypatch):
    search, train = _commands_of(tmp_path, monkeypatch, "make_run_60ep")
    assert [a.replace("make_run_60ep", "make_run") for a in search] == _commands_of(
        tmp_path, monkeypatch, "make_run")[0]
    assert sorted(train[i + 1] for i, a in enumerate(train) if a == "--set") == [
        "train.epochs=60", "train.precision=fp32"]
    assert "$(if $(EPOCHS),--set train.epochs=$(EPOCHS))" in (ROOT / "Makefile").read_text()


def test_a_make_run_variant_changes_only_its_search(tmp_path, monkeypatch):
    search, train = _commands_of(tmp_path, monkeypatch, "make_run_polish")
    assert [search[i + 1] for i, a in enumerate(search) if a == "--set"] == [
        "search.polish_evaluations=300"]
    assert [train[i + 1] for i, a in enumerate(train) if a == "--set"] == ["train.precision=fp32"]
    # a longer uniform row: its bits from its name, its epochs from QAT_EPOCHS
    (train,) = _commands_of(tmp_path, monkeypatch, "qat_w2_30ep")
    assert train[train.index("--bits") + 1] == "2" and "train.epochs=30" in train
    assert "train.precision=fp32" in train  # pinned: it resumes on other CPUs
    for name, setting in (("qat_w2_lsq", "qat.weight_scale=lsq"), ("qat_w2_lr2", "train.lr=0.02"),
                          ("qat_w2_lr05", "train.lr=0.005"),
                          ("qat_w2_freeze", "qat.freeze_oscillations=0.02")):
        (train,) = _commands_of(tmp_path, monkeypatch, name)  # the recipe's 10 epochs, one change
        assert train[train.index("--bits") + 1] == "2" and "--plan" not in train
        assert [train[i + 1] for i, a in enumerate(train) if a == "--set"] == [
            "train.precision=fp32", setting]


def test_an_unfinished_row_is_parked_and_resumes_from_its_checkpoint_elsewhere(tmp_path):
    """--park copies a row's last QAT checkpoint and recipe into the results folder; on a
    machine whose runs/ is gone they are put back where train.py resumes, never over a run
    folder that has its own, and dropped once the row is finished."""
    from results_table import inflight

    layout = dataclasses.replace(LAYOUT, results=tmp_path / "results", runs=tmp_path / "runs")
    qat = layout.runs / "abl13_kd" / "qat"
    qat.mkdir(parents=True)
    torch.save({"epoch": 3, "state_dict": {}}, qat / "checkpoint_last.pt")
    (qat / "recipe.yaml").write_text("version: 1\n")
    (layout.runs / "abl13_t1" / "qat").mkdir(parents=True)  # started, no checkpoint yet
    assert inflight.park(layout, ["abl13_kd", "abl13_t1", "fp32"]) == {"abl13_kd": 4}
    info = inflight.parked(layout)["abl13_kd"]
    assert info["epochs_done"] == 4 and info["cpu"]
    shutil.rmtree(layout.runs)  # the next machine
    assert inflight.unpark(layout, "abl13_kd") and not inflight.unpark(layout, "abl13_t1")
    assert torch.load(qat / "checkpoint_last.pt", weights_only=True)["epoch"] == 3
    assert (qat / "recipe.yaml").read_text() == "version: 1\n"
    torch.save({"epoch": 5}, qat / "checkpoint_last.pt")  # it trained on: not overwritten
    assert not inflight.unpark(layout, "abl13_kd")
    assert torch.load(qat / "checkpoint_last.pt", weights_only=True)["epoch"] == 5
    (layout.results / "abl13_kd.json").write_text("{}")
    assert inflight.park(layout, ["abl13_kd"]) == {}  # finished rows are not parked
    inflight.clear(layout, "abl13_kd")
    assert inflight.parked(layout) == {}


def test_a_fork_row_goes_on_from_its_parents_kept_checkpoint_with_its_settings(tmp_path,
                                                                                monkeypatch):
    """A fork row shares its parent's run up to an epoch: the parent keeps its checkpoint there
    (parked with it, and kept past the parent's end while the fork is unfinished), and the
    fork's run starts from it with the fork's settings in its recipe, so train.py resumes it."""
    from mpq.checkpoint import load_checkpoint, save_checkpoint
    from mpq.config import load_recipe, recipe_to_dict
    from mpq.qat import QATRecipe
    from results_table import compute, inflight

    fork, (_, parent, epochs, settings) = next(iter(results.layout.FORK_ROWS.items()))
    layout = dataclasses.replace(LAYOUT, results=tmp_path / "results", runs=tmp_path / "runs")
    layout.results.mkdir()
    ran = []
    monkeypatch.setattr(compute, "_exported_row",
                        lambda layout, commands, export_dir, log: ran.extend(commands) or {})
    with pytest.raises(compute.RowFailed, match=f"run that row past epoch {epochs}"):
        compute.make_row(layout, fork)  # the parent has not got there yet
    assert not (layout.runs / fork / "qat" / "checkpoint_last.pt").exists()
    compute.make_row(layout, parent)  # its command keeps the checkpoint after that epoch
    (parent_cmd,) = [[str(a) for a in cmd] for cmd in ran]
    assert parent_cmd[parent_cmd.index("--keep-epoch") + 1] == str(epochs)

    recipe = load_recipe(ROOT / results.layout.QAT_RECIPE,
                         [*results.layout.ROW_SETTINGS[parent], f"train.epochs={epochs + 5}"],
                         cls=QATRecipe)
    qat = layout.runs / parent / "qat"
    save_checkpoint(qat / f"checkpoint_epoch{epochs}.pt",
                    {"epoch": epochs - 1, "recipe": recipe_to_dict(recipe), "state_dict": {}})
    save_checkpoint(qat / "checkpoint_last.pt", {"epoch": epochs + 1, "state_dict": {}})
    (qat / "recipe.yaml").write_text("version: 1\n")
    assert inflight.park(layout, [parent]) == {parent: epochs + 2}
    shutil.rmtree(layout.runs)  # the next machine: the fork starts from the parked copy
    (layout.results / f"{parent}.json").write_text("{}")
    inflight.clear(layout, parent)  # the parent finished; its kept checkpoint stays
    assert inflight.parked(layout) == {}
    ran.clear()
    row = compute.make_row(layout, fork)
    (fork_cmd,) = [[str(a) for a in cmd] for cmd in ran]
    sets = [fork_cmd[i + 1] for i, a in enumerate(fork_cmd) if a == "--set"]
    assert sets[-len(settings):] == settings and "--keep-epoch" not in fork_cmd
    assert fork_cmd[fork_cmd.index("--out") + 1] == str(layout.runs / fork / "qat")
    assert row["forked_from"] == {"row": parent, "epochs": epochs, "settings": settings}
    started = load_checkpoint(layout.runs / fork / "qat" / "checkpoint_last.pt")
    assert started["epoch"] == epochs - 1
    assert started["recipe"]["qat"]["freeze_ratio_at"] == 0.7  # the fork's setting
    assert started["recipe"]["train"] == recipe_to_dict(recipe)["train"]  # the rest, the parent's
    assert "freeze_ratio_at: 0.7" in (layout.runs / fork / "qat" / "recipe.yaml").read_text()
    assert (layout.results / "inflight" / parent / f"checkpoint_epoch{epochs}.pt").is_file()
    (layout.results / f"{fork}.json").write_text("{}")
    inflight.clear(layout, fork)  # the fork's end: nothing needs the parent's files now
    assert not (layout.results / "inflight" / parent).exists()


def test_a_forked_run_ends_where_its_own_command_run_from_scratch_does(
        tmp_path, monkeypatch, tiny_teacher, tiny_recipe_dict, write_recipe):
    """A fork resumed from its parent's kept checkpoint computes, step for step, what its own
    command computes from scratch when its settings change nothing before the fork's epoch."""
    from conftest import run_script
    from mpq.checkpoint import load_checkpoint
    from results_table import compute, inflight

    tiny_recipe_dict["train"]["epochs"] = 4
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    forks = {"fork": ("", "parent", 2, ["qat.freeze_bn_epoch=3"])}  # BN folded from epoch 3
    monkeypatch.setattr(compute, "FORK_ROWS", forks)
    monkeypatch.setattr(inflight, "FORK_ROWS", forks)
    layout = dataclasses.replace(LAYOUT, results=tmp_path / "results", runs=tmp_path / "runs")
    train = ["train.py", "--recipe", write_recipe(tiny_recipe_dict), "--device", "cpu",
             "--quiet", "--teacher", tiny_teacher, "--bits", "2", "--no-export"]
    parent = run_script(*train, "--keep-epoch", "2", "--out", layout.runs / "parent" / "qat")
    assert parent.returncode == 0, parent.stderr
    compute.seed_fork(layout, "fork")
    for out in (layout.runs / "fork" / "qat", tmp_path / "straight"):
        done = run_script(*train, "--set", "qat.freeze_bn_epoch=3", "--out", out)
        assert done.returncode == 0, done.stderr
    forked = load_checkpoint(layout.runs / "fork" / "qat" / "model.pt")
    straight = load_checkpoint(tmp_path / "straight" / "model.pt")
    unforked = load_checkpoint(layout.runs / "parent" / "qat" / "model.pt")
    assert all(torch.equal(forked["state_dict"][k], straight["state_dict"][k])
               for k in straight["state_dict"])
    assert not all(torch.equal(forked["state_dict"][k], unforked["state_dict"][k])
                   for k in unforked["state_dict"])  # the setting took hold after the fork
    history = load_checkpoint(layout.runs / "fork" / "qat" / "checkpoint_last.pt")["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]  # the parent's two, then its own


def test_a_row_being_computed_is_parked_as_it_trains(tmp_path):
    """--park-every: the row's latest checkpoint reaches the results folder while it trains,
    and the parking stops with the row."""
    import threading
    import time

    from results_table import inflight

    layout = dataclasses.replace(LAYOUT, results=tmp_path / "results", runs=tmp_path / "runs")
    qat = layout.runs / "qat_w2_30ep" / "qat"
    qat.mkdir(parents=True)
    (qat / "recipe.yaml").write_text("version: 1\n")

    def parked_epochs(epochs):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = inflight.parked(layout).get("qat_w2_30ep")
            if info and info["epochs_done"] == epochs:
                return True
            time.sleep(0.02)
        return False

    with inflight.parking(layout, "qat_w2_30ep", 0.001):
        for epoch in (0, 2):  # the trainer saves as it goes
            torch.save({"epoch": epoch, "state_dict": {}}, qat / "checkpoint_last.pt")
            assert parked_epochs(epoch + 1)
    assert not any(t.name.startswith("park ") for t in threading.enumerate())
    with inflight.parking(layout, "qat_w2_30ep", None):  # never
        pass


def test_the_w4a4_row_keeps_the_image_at_8_bits_and_everything_else_at_4(tmp_path):
    if not LAYOUT.teacher.exists():
        pytest.skip(f"needs the committed teacher {LAYOUT.teacher}")
    from mpq.quant import load_plan
    from results_table import compute

    plan = load_plan(compute.w4a4_plan(LAYOUT, tmp_path / "plan.json"))
    first, *rest = plan.layers.items()
    assert first == ("conv1", {"w_bits": 4, "a_bits": 8})
    assert len(rest) == 21 and all(v == {"w_bits": 4, "a_bits": 4} for _, v in rest)


def test_runtime_ranges_span_the_int8_rows_and_name_the_fastest_fp32():
    lat = {"1": {"fp32/pytorch": 1.3, "fp32/onnxruntime": 0.29, "ao_int8_ptq/pytorch": 0.1,
                 "a/onnxruntime": 0.2, "a/openvino": 0.15, "b/onnxruntime": 0.25,
                 "b/openvino": 0.12}}
    assert runtime_ranges(lat) == [
        "batch 1: onnxruntime int8 0.20-0.25 ms (2 rows); openvino int8 0.12-0.15 ms (2 rows); "
        "best FP32 0.29 ms (onnxruntime)"]


def test_each_qat_change_is_drawn_beside_the_spread_of_the_recipes_own_runs(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    layout = dataclasses.replace(LAYOUT, runs=tmp_path)
    rows = {"fp32": row(89.57, "model_fp32.onnx", 1_171_834),
            "abl13_fp32": row(89.07, "model.mpq", 83_799), "abl13_s1": row(89.16, "model.mpq", 1),
            "abl13_bf16": row(89.36, "model.mpq", 1), "abl13_lsq": row(89.11, "model.mpq", 1),
            "qat_w2": row(87.85, "model.mpq", 1), "qat_w2_lr2": row(86.60, "model.mpq", 1)}
    points = results.table.change_points(rows)
    assert points["13x plan"] == ([0.5, 0.41, 0.21], [("LSQ weight scales", 0.46)])
    assert points["ternary W2A8"] == ([1.72], [("lr 0.02", 2.97)])
    png = tmp_path / "changes.png"
    results.table.log_changes(layout, rows, png=png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert "changes/points_lost_by_qat_change" in events.Tags()["images"]


def test_a_results_run_stopped_by_sigterm_stops_the_command_it_runs(tmp_path):
    """`kill PID` of results.py once left its train.py training on alone, beside the next."""
    pidfile, log = tmp_path / "child.pid", tmp_path / "log.txt"
    child = ("import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); "
             "time.sleep(120)")
    wrapper = ("import sys; sys.path.insert(0, 'benchmarks'); from pathlib import Path; "
               "from results_table import Layout, compute; compute.stop_commands_on_sigterm(); "
               f"compute._run(Layout.of(Path('.').resolve()), ['-c', {child!r}, {str(pidfile)!r}], "
               f"Path({str(log)!r}))")
    proc = subprocess.Popen([sys.executable, "-c", wrapper], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (pidfile.exists() and pidfile.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    pid = int(pidfile.read_text())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_the_ternary_row_with_first_and_last_layers_at_8_bits_trains_that_plan(tmp_path,
                                                                               monkeypatch):
    from mpq.quant import load_plan

    (train,) = _commands_of(tmp_path, monkeypatch, "qat_w2_fl8")
    plan = load_plan(train[train.index("--plan") + 1])
    bits = {name: layer["w_bits"] for name, layer in plan.layers.items()}
    assert bits.pop("conv1") == 8 and bits.pop("fc") == 8 and set(bits.values()) == {2}
    assert {layer["a_bits"] for layer in plan.layers.values()} == {8}
    assert [train[i + 1] for i, a in enumerate(train) if a == "--set"] == ["train.precision=fp32"]


def test_a_warm_restart_row_starts_from_its_base_row_and_counts_both_schedules(tmp_path,
                                                                              monkeypatch):
    from results_table import compute

    base, epochs = compute.WARM_ROWS["qat_w2_warm60"]
    # Without the base row's run, it is computed first (its own command), then the warm start.
    first, train = _commands_of(tmp_path, monkeypatch, "qat_w2_warm60")
    assert first[first.index("--out") + 1] == str(tmp_path / base / "qat")
    init = tmp_path / base / "qat" / "model.pt"
    assert train[train.index("--init") + 1] == str(init)
    assert train[train.index("--bits") + 1] == "2"
    assert [train[i + 1] for i, a in enumerate(train) if a == "--set"] == [
        f"train.epochs={epochs}", "train.precision=fp32"]
    init.parent.mkdir(parents=True)
    init.write_bytes(b"")
    assert len(_commands_of(tmp_path, monkeypatch, "qat_w2_warm60")) == 1  # already there
    # The row's epochs are both schedules'; the table and the epoch figure read that.
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "export.json").write_text(json.dumps({
        "onnx_top1": 88.9, "mpq_bytes": 60_966, "fake_quant_top1": 88.9, "torch_int8_top1": 88.9,
        "files": {"model_int8.onnx": {"bytes": 1}}}))
    (export.parent / "metrics.json").write_text(json.dumps({
        "epochs": 30, "train_seconds": 1.0, "init": {"sha256": "0", "epochs": 30, "top1": 88.4}}))
    monkeypatch.undo()
    monkeypatch.setattr(compute, "_run", lambda *a: None)
    row = compute._exported_row(LAYOUT, [["train.py"]], export, tmp_path / "log.txt")
    assert (row["epochs"], row["init_epochs"], row["init_top1"]) == (60, 30, 88.4)


def test_a_row_keeps_its_runs_test_top1_after_every_epoch(tmp_path, monkeypatch):
    from results_table import compute

    export = tmp_path / "qat" / "export"
    export.mkdir(parents=True)
    (export / "export.json").write_text(json.dumps({
        "onnx_top1": 89.1, "mpq_bytes": 83_799, "fake_quant_top1": 89.1, "torch_int8_top1": 89.1,
        "files": {"model_int8.onnx": {"bytes": 1}}}))
    (export.parent / "metrics.json").write_text(json.dumps({"epochs": 3, "train_seconds": 1.0}))
    monkeypatch.setattr(compute, "_run", lambda *a: None)
    # Without the run's checkpoint (a row made before it was kept) the curve is empty.
    row = compute._exported_row(LAYOUT, [["train.py"]], export, tmp_path / "log.txt")
    assert row["test_top1_by_epoch"] == []
    from mpq.checkpoint import CHECKPOINT_FORMAT, CHECKPOINT_VERSION

    torch.save({"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                "history": [{"epoch": e, "test_top1": t} for e, t in
                            enumerate([85.123, 87.5, 88.996])]},
               export.parent / "checkpoint_last.pt")
    row = compute._exported_row(LAYOUT, [["train.py"]], export, tmp_path / "log.txt")
    assert row["test_top1_by_epoch"] == [85.12, 87.5, 89.0]
