"""torchrun with 2 CPU processes (gloo) trains the same model as one process."""

import os
import subprocess
import sys

import torch

from conftest import ROOT
from mpq.checkpoint import load_checkpoint


def test_two_gloo_processes_match_one(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    # BN folded and frozen from the start: each rank's half-batch then yields exactly half of
    # the full batch's gradient sum, so the runs differ only by float rounding.
    tiny_recipe_dict["train"].update(lr=0.0005, warmup_epochs=0)
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "freeze_bn_epoch": 0}
    args = ["train.py", "--recipe", str(write_recipe(tiny_recipe_dict)), "--teacher",
            str(tiny_teacher), "--bits", "4", "--no-export", "--device", "cpu", "--quiet", "--out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", *args, str(tmp_path / "two")], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = load_checkpoint(tmp_path / "one" / "model.pt")
    b = load_checkpoint(tmp_path / "two" / "model.pt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, va in a["state_dict"].items():
        vb = b["state_dict"][key]
        if va.is_floating_point():
            assert torch.allclose(va, vb, rtol=1e-4, atol=1e-6), key
    start = load_checkpoint(tiny_teacher)["state_dict"]["fc.weight"]
    moved = (a["state_dict"]["fc.layer.weight"] - start).abs().max()
    assert moved > 1e-4  # training did change the weights, so the comparison means something
    assert a["metrics"]["top1"] == b["metrics"]["top1"]
    assert abs(a["metrics"]["test_loss"] - b["metrics"]["test_loss"]) < 1e-4
