"""Bad input through the scripts, as a user would give it: each case exits with code 2 and one
line on stderr naming what was wrong and what to do, before any file is written or changed."""

import inspect
import os

import pytest
import torch
import yaml

from conftest import ROOT, run_script
from imagenet_layout import make_imagenet_layout
from mpq.errors import UsageError


def refused(args, match, *, watch=()):
    before = {p: p.read_bytes() for p in watch if p.is_file()}
    result = run_script(*args, timeout=120)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, (args, result.stderr[-2000:])
    assert len(lines) == 1 and match in lines[0], (args, result.stderr[-2000:])
    assert {p: p.read_bytes() for p in watch if p.is_file()} == before
    return lines[0]


@pytest.fixture
def recipe(tmp_path, tiny_recipe_dict):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    return path


@pytest.fixture
def out(tmp_path):
    """A run folder with a file in it that no refused command may touch."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "keep.txt").write_text("precious")
    return folder


def test_bad_recipes_and_values_are_one_line(tmp_path, recipe, out):
    train = ["train.py", "--device", "cpu", "--quiet", "--out", out]
    watch = [out / "keep.txt"]
    junk = tmp_path / "junk.yaml"
    junk.write_bytes(bytes(range(256)) * 4)
    refused([*train, "--recipe", junk], "not a text file", watch=watch)
    broken = tmp_path / "broken.yaml"
    broken.write_text("train:\n  epochs: [1, 2\n")
    refused([*train, "--recipe", broken], "not valid YAML at line", watch=watch)
    empty = tmp_path / "empty.yaml"
    empty.write_text("\n# nothing\n")
    refused([*train, "--recipe", empty], "is empty", watch=watch)
    for setting, message in [("train.lr=.nan", "train.lr: expected a finite number"),
                             ("train.lr=.inf", "train.lr: expected a finite number"),
                             ("train.weight_decay=-1", "train.weight_decay must be >= 0"),
                             ("train.momentum=1.5", "train.momentum must be in [0, 1)"),
                             ("train.precision=fp8", "train.precision must be"),
                             ("data.loader=disk", "data.loader must be"),
                             ("train.max_steps=-1", "train.max_steps")]:
        refused([*train, "--recipe", recipe, "--set", setting], message, watch=watch)
    refused([*train, "--recipe", recipe, "--device", "tpu"], "--device 'tpu'", watch=watch)


def test_output_folders_that_cannot_be_one_are_refused_before_any_work(tmp_path, recipe):
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    train = ["train.py", "--recipe", recipe, "--device", "cpu", "--quiet", "--out"]
    refused([*train, a_file], "is an existing file", watch=[a_file])
    refused([*train, a_file / "run"], "which is a file", watch=[a_file])
    refused(["search.py", "--recipe", ROOT / "recipes" / "resnet20_cifar10.yaml", "--budget",
             "13x", "--out", a_file], "is an existing file", watch=[a_file])


@pytest.mark.parametrize("budget, message", [
    ("0", "must be a positive, finite number"), ("-3", "is not understood"),
    ("1e400", "must be a positive, finite number"), ("1e400x", "must be a positive"),
    ("0.5x", "larger than FP32"), ("13y", "budget unit 'y'"), ("0.1B", "under one byte")])
def test_budgets_that_mean_nothing_are_refused(tmp_path, tiny_teacher, tiny_recipe_dict, budget,
                                               message):
    recipe = {**tiny_recipe_dict, "search": {"checkpoint": str(tiny_teacher)}}
    recipe.pop("train")
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(recipe))
    refused(["search.py", "--recipe", path, "--budget", budget, "--out", tmp_path / "s",
             "--device", "cpu", "--quiet"], message)
    assert not (tmp_path / "s").exists()


def test_eval_and_export_arguments(tmp_path, tiny_teacher):
    for cmd in ("eval", "export"):
        for size, message in (("0", "must be >= 1, got 0"), ("-5", "must be >= 1, got -5"),
                              ("many", "expected a whole number, got 'many'")):
            extra = ["--out", tmp_path / "x"] if cmd == "export" else []
            line = refused(["-m", "mpq", cmd, "--checkpoint", tiny_teacher, "--batch-size",
                            size, *extra], message)
            assert "--batch-size" in line and line.endswith(f"python -m mpq {cmd} --help")
    refused(["train.py", "--recipe"], "--recipe: expected one argument")  # argparse's own
    refused(["-m", "mpq", "eval", "--checkpoint", tmp_path / "none.pt"], "does not exist")
    a_file = tmp_path / "file.txt"
    a_file.write_text("precious")
    refused(["-m", "mpq", "export", "--checkpoint", tiny_teacher, "--out", a_file],
            "is an existing file", watch=[a_file])


def test_splits_whose_classes_differ_are_refused_naming_them(tmp_path, tiny_recipe_dict, out):
    root = make_imagenet_layout(tmp_path / "data", classes=4, train_per_class=8,
                                val_per_class=2, sizes=(12, 20), name="class{}")
    (root / "val" / "class3").rename(root / "val" / "class9")
    tiny_recipe_dict["data"].update(dataset="imagefolder")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    train = ["train.py", "--recipe", path, "--data-root", root, "--device", "cpu", "--quiet",
             "--out", out]
    refused(train, "missing class3; extra class9", watch=[out / "keep.txt"])
    refused([*train, "--set", "data.loader=stream"], "missing class3; extra class9")


def test_eval_onnx_on_bad_folders_files_and_images(tmp_path, tiny_recipe_dict):
    tool = ["tools/eval_onnx.py", "--data-root", tmp_path / "data", "--export"]
    refused([*tool, tmp_path / "missing"], "is not a folder")
    (tmp_path / "empty").mkdir()
    refused([*tool, tmp_path / "empty"], "has no export.json")
    export = tmp_path / "export"
    export.mkdir()
    (export / "export.json").write_text('{"input": {"shape": [1, 3, 12, 12], "name": "input"},'
                                        ' "normalization": {"mean": [0, 0, 0], "std": [1, 1, 1]}}')
    (export / "model_int8.onnx").write_bytes(b"\x08\x07 not an onnx model")
    make_imagenet_layout(tmp_path / "data", classes=2, train_per_class=1, val_per_class=2,
                         sizes=(12, 14))
    refused([*tool, export], "cannot be loaded by ONNX Runtime")
    (export / "export.json").write_text("{not json")
    refused([*tool, export], "is damaged or not an mpq export")
    committed = ROOT / "checkpoints" / "resnet20_cifar10" / "qat_w8"
    (tmp_path / "data" / "val" / "n00000001" / "zero.JPEG").write_bytes(b"")
    refused([*tool, committed], "cannot decode image")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: no folder is read-only")
def test_an_output_folder_this_user_cannot_write_is_refused(tmp_path, recipe):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        refused(["train.py", "--recipe", recipe, "--out", locked / "run"], "is not writable")
    finally:
        locked.chmod(0o700)


# Whose fault a failure is: a user's model that fails is named with its own exception, file and
# line (one line, exit code 2); mpq's own failures keep their traceback (exit code 1).

class _RaisesWhileTraced(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        raise ValueError("this net needs its config file")


class _BranchesOnData(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y


def _line_of(cls, text: str) -> str:
    """`file:line` of the line of `cls`'s source that contains `text`."""
    lines, start = inspect.getsourcelines(cls)
    line = start + next(i for i, ln in enumerate(lines) if text in ln)
    return f"{__file__}:{line}"


@pytest.mark.parametrize("cls, text, message", [
    (_RaisesWhileTraced, "raise ValueError",
     "your model raised ValueError: this net needs its config file at {where} (in "
     "_RaisesWhileTraced.forward) while torch.fx traced it"),
    (_BranchesOnData, "if y.sum()",
     "the model cannot be traced with torch.fx in _BranchesOnData.forward at {where}: TraceError"),
])
def test_a_model_that_fails_while_traced_is_named_at_its_own_line(cls, text, message):
    from mpq.quant import prepare_qat, uniform_plan

    with pytest.raises(UsageError) as info:
        prepare_qat(cls(), uniform_plan("m", ["conv"], w_bits=8),
                    example_inputs=(torch.zeros(1, 3, 8, 8),))
    assert message.format(where=_line_of(cls, text)) in str(info.value)
    assert "\n" not in str(info.value)


def test_mpqs_own_failure_while_tracing_or_exporting_keeps_its_traceback(monkeypatch, tmp_path):
    from mpq.export import onnx_qdq
    from mpq.quant import calibrate_, prepare_qat, quantization_of, uniform_plan

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3))
    plan = uniform_plan("m", ["0"], w_bits=8)
    q = prepare_qat(net, plan, example_inputs=(torch.zeros(1, 3, 8, 8),))
    calibrate_(q, [torch.randn(4, 3, 8, 8)])
    with monkeypatch.context() as patch:  # a bug in mpq's code that tracing runs: a TypeError
        patch.setattr(torch.fx, "symbolic_trace", quantization_of)
        with pytest.raises(TypeError, match="was not prepared by mpq"):
            prepare_qat(net, plan, example_inputs=(torch.zeros(1, 3, 8, 8),))
    # a bug in mpq's QDQ modules, which only the exporter runs: the exporter's error, with the
    # AttributeError raised in mpq/export/onnx_qdq.py as its cause
    monkeypatch.setattr(onnx_qdq, "_qd", lambda: object())
    with pytest.raises(Exception) as info:
        onnx_qdq.export_onnx(q.eval(), tmp_path / "m.onnx", input_shape=(3, 8, 8))
    assert not isinstance(info.value, UsageError)
    causes = [info.value]
    while causes[-1].__cause__ is not None:
        causes.append(causes[-1].__cause__)
    assert any(isinstance(e, AttributeError) and "quantize_per_tensor" in str(e) for e in causes)
