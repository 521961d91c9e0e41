"""torchvision's resnet18 through the three scripts on the synthetic set (issue: any model):
an FP32 teacher, search.py under an 8x budget, train.py QAT with distillation and export; and a
user's model that torch.fx cannot trace, refused with one clear line."""

import json
import os

import pytest
import yaml

from conftest import ROOT, TINY_RECIPE, run_script


@pytest.mark.slow
def test_resnet18_teacher_search_qat_and_export(tmp_path):
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["model"] = {"name": "resnet18", "num_classes": 4}
    recipe["data"].update(image_size=16, synthetic_train_size=128, synthetic_test_size=64)
    recipe["train"].update(epochs=1, batch_size=32)
    fp32 = tmp_path / "fp32.yaml"
    fp32.write_text(yaml.safe_dump(recipe))
    common = ["--device", "cpu", "--quiet"]
    result = run_script("train.py", "--recipe", fp32, "--out", tmp_path / "teacher", *common)
    assert result.returncode == 0, result.stderr
    teacher = tmp_path / "teacher" / "model.pt"

    search = {k: v for k, v in recipe.items() if k != "train"}
    search["search"] = {"checkpoint": str(teacher), "trials": 3, "holdout_images": 32,
                        "batch_size": 16, "sensitivity_batches": 1, "calibration_batches": 1,
                        "bit_choices": [2, 4, 8]}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    result = run_script("search.py", "--recipe", tmp_path / "search.yaml", "--budget", "8x",
                        "--out", tmp_path / "search", *common)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    assert len(plan["layers"]) == 21  # 20 convs (3 of them 1x1 downsamples) and the fc

    recipe["qat"] = {"calibration_batches": 2}
    (tmp_path / "qat.yaml").write_text(yaml.safe_dump(recipe))
    result = run_script("train.py", "--recipe", tmp_path / "qat.yaml", "--teacher", teacher,
                        "--plan", tmp_path / "search" / "plan.json", "--out", tmp_path / "qat",
                        *common, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "qat" / "export" / "export.json").read_text())
    assert report["checks"]["passed"], report["checks"]
    # The budget holds on disk: the packed file is no larger than the plan says.
    assert report["mpq_bytes"] <= plan["size_bytes"] <= plan["budget_bytes"]
    assert report["compression"] >= 8


@pytest.mark.slow
def test_search_on_resnet18_with_1000_classes_samples_its_sensitivity(tmp_path):
    """ImageNet's class count: sensitivity by label draws (its cost does not grow with the
    classes), every layer at <= 5% relative SE, through to plan.json; bad settings are one
    line and exit 2."""
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["model"] = {"name": "resnet18", "num_classes": 1000}
    recipe["data"].update(image_size=16, synthetic_train_size=96, synthetic_test_size=16)
    recipe["train"].update(epochs=1, batch_size=32)
    (tmp_path / "fp32.yaml").write_text(yaml.safe_dump(recipe))
    common = ["--device", "cpu", "--quiet"]
    result = run_script("train.py", "--recipe", tmp_path / "fp32.yaml", "--out",
                        tmp_path / "teacher", *common)
    assert result.returncode == 0, result.stderr
    search = {k: v for k, v in recipe.items() if k != "train"}
    search["search"] = {"checkpoint": str(tmp_path / "teacher" / "model.pt"), "trials": 2,
                        "holdout_images": 16, "batch_size": 16, "sensitivity_batches": 1,
                        "calibration_batches": 1, "bit_choices": [2, 4, 8]}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    args = ["search.py", "--recipe", tmp_path / "search.yaml", "--budget", "8x", *common]
    result = run_script(*args, "--out", tmp_path / "search", timeout=600)
    assert result.returncode == 0, result.stderr
    sens = json.loads((tmp_path / "search" / "sensitivity.json").read_text())["layers"]
    assert len(sens) == 21 and {s["estimator"] for s in sens.values()} == {"sampled"}
    assert all(0 < s["trace_se"] <= 0.05 * s["trace"] for s in sens.values())
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    for bad, message in [("search.memory_mb=0", "memory_mb"),
                         ("search.estimator=exact", "would hold"),
                         ("search.rel_tol=2", "rel_tol")]:
        result = run_script(*args, "--out", tmp_path / "bad", "--set", bad)
        assert result.returncode == 2 and message in result.stderr, (bad, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


USER_NET = '''
import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        y = self.conv(x)
        if y.mean() > 0:  # data-dependent control flow: torch.fx cannot trace it
            y = y * 2
        return y


def gated(num_classes=4):
    return nn.Sequential(Gate(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))
'''


def test_a_model_fx_cannot_trace_is_one_clear_error_through_the_scripts(tmp_path):
    """A user's factory whose forward branches on data: FP32 training works (eager), the search
    stops with exit code 2 and one line naming the module, the cause and what to do."""
    (tmp_path / "usernet.py").write_text(USER_NET)
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["model"] = {"name": "usernet:gated", "num_classes": 4}
    recipe["train"].update(epochs=1)
    (tmp_path / "fp32.yaml").write_text(yaml.safe_dump(recipe))
    common = ["--device", "cpu", "--quiet"]
    result = run_script("train.py", "--recipe", tmp_path / "fp32.yaml", "--out",
                        tmp_path / "teacher", *common, env=env)
    assert result.returncode == 0, result.stderr
    search = {k: v for k, v in recipe.items() if k != "train"}
    search["search"] = {"checkpoint": str(tmp_path / "teacher" / "model.pt"), "trials": 2,
                        "holdout_images": 32, "batch_size": 16}
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    result = run_script("search.py", "--recipe", tmp_path / "search.yaml", "--budget", "4x",
                        "--out", tmp_path / "search", *common, env=env)
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "cannot be traced" in lines[0] and "in Gate.forward" in lines[0]
    assert "control flow" in lines[0] and "torch.where" in lines[0]
    assert not (tmp_path / "search" / "plan.json").exists()
