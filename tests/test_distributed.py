"""torchrun with 2 CPU processes (gloo) trains the same model as one process."""

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from mpq.checkpoint import load_checkpoint


def test_two_gloo_processes_match_one(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    # BN folded and frozen from the start: each rank's half-batch then yields exactly half of
    # the full batch's gradient sum, so the runs differ only by float rounding, float32's
    # (under bf16 autocast, which `auto` may choose, the halves round differently).
    tiny_recipe_dict["train"].update(lr=0.0005, warmup_epochs=0, precision="fp32")
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


@pytest.mark.slow
def test_two_gloo_processes_streaming_match_one_and_resume_per_rank(tmp_path, tiny_teacher,
                                                                    tiny_recipe_dict,
                                                                    write_recipe):
    """From files, each rank decodes only its half of every global batch; a run killed after
    a mid-epoch checkpoint resumes every rank on its own batch and RNG."""
    import signal
    import time

    from imagenet_layout import make_imagenet_layout

    root = make_imagenet_layout(tmp_path / "data", classes=4, train_per_class=48,
                                val_per_class=8, sizes=(12, 30), name="class{}")
    tiny_recipe_dict["data"].update(dataset="imagefolder", loader="stream", workers=1)
    tiny_recipe_dict["train"].update(lr=0.0005, warmup_epochs=0, checkpoint_steps=2,
                                     precision="fp32")
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "freeze_bn_epoch": 0}
    args = ["train.py", "--recipe", str(write_recipe(tiny_recipe_dict)), "--teacher",
            str(tiny_teacher), "--bits", "4", "--no-export", "--device", "cpu", "--quiet",
            "--data-root", str(root), "--out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2"]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([*torchrun, *args, str(tmp_path / "two")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = load_checkpoint(tmp_path / "one" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "two" / "model.pt")["state_dict"]
    for key, va in a.items():
        if va.is_floating_point():
            assert torch.allclose(va, b[key], rtol=1e-4, atol=1e-6), key

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*torchrun, *args, str(killed)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:
        last = killed / "checkpoint_last.pt"
        try:
            if last.is_file() and "partial" in load_checkpoint(last):
                break
        except Exception:
            pass
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    state = load_checkpoint(killed / "checkpoint_last.pt")
    assert "partial" in state and len(state["rng_ranks"]) == 2
    assert not (killed / "model.pt").exists()
    resumed = subprocess.run([*torchrun, *args, str(killed)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    c = load_checkpoint(killed / "model.pt")["state_dict"]
    assert all(torch.equal(b[k], c[k]) for k in b)
