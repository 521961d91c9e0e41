"""ImageNet's shape end to end: 1000 classes of JPEGs of varied sizes in train/<wnid>/ and
val/<wnid>/, streamed (never decoded whole), through teacher training, search, QAT and export
on torchvision's resnet18 at a reduced resolution, with the peak memory of each stage printed."""

import json
import resource

import pytest

from conftest import ROOT, kill_mid_epoch_and_resume, run_script
from imagenet_layout import make_imagenet_layout

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def sets(*pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


# The shipped ImageNet recipes, at 32 px, with small batches and few steps.
SMALL = sets("data.image_size=32", "data.resize=36", "data.workers=2", "train.batch_size=32",
             "train.eval_batch_size=250")


@pytest.mark.slow
def test_resnet18_on_imagenet_layout_trains_resumes_searches_quantizes_and_exports(tmp_path):
    root = make_imagenet_layout(tmp_path / "imagenet", classes=1000, train_per_class=2,
                                val_per_class=1)
    common = ["--data-root", root]

    # Teacher: 8 steps of the 90-epoch recipe; SIGKILL after a mid-epoch checkpoint, and the
    # resumed run ends with the same weights as one never interrupted.
    fp32 = ["train.py", "--recipe", ROOT / "recipes" / "resnet18_imagenet_fp32.yaml", *common,
            *SMALL, *sets("train.max_steps=8", "train.checkpoint_steps=3")]
    out = kill_mid_epoch_and_resume(fp32, tmp_path, from_partial=True, timeout=600)
    assert "at step" in out
    teacher = tmp_path / "straight" / "model.pt"
    metrics = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    assert metrics["steps"] == 8 and metrics["epochs"] == 1
    assert not list((tmp_path / "cache").glob("decoded/*")), "a split was decoded into memory"
    print(f"teacher: peak RSS {peak_rss_mb():.0f} MB")

    result = run_script("search.py", "--recipe", ROOT / "recipes" / "resnet18_imagenet.yaml",
                        "--budget", "8x", "--out", tmp_path / "search", "--checkpoint", teacher,
                        "--device", "cpu", "--quiet", *common, *SMALL,
                        *sets("search.trials=2", "search.holdout_images=32",
                              "search.batch_size=16", "search.calibration_batches=1",
                              "search.max_draws=16",
                              "search.bit_choices=[2,4,8]"), timeout=900)
    assert result.returncode == 0, result.stderr
    plan = json.loads((tmp_path / "search" / "plan.json").read_text())
    assert plan["size_bytes"] <= plan["budget_bytes"]
    print(f"search: peak RSS {peak_rss_mb():.0f} MB")

    result = run_script("train.py", "--recipe", ROOT / "recipes" / "resnet18_imagenet_qat.yaml",
                        "--teacher", teacher, "--plan", tmp_path / "search" / "plan.json",
                        "--out", tmp_path / "qat", "--device", "cpu", "--quiet", *common,
                        *SMALL, *sets("train.max_steps=2", "qat.calibration_batches=1"),
                        timeout=900)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "qat" / "export" / "export.json").read_text())
    assert report["mpq_bytes"] <= plan["size_bytes"]
    assert report["input"]["shape"][-1] == 32 and report["input"]["resize"] == 36
    for name in ("model.mpq", "model_int8.onnx", "model_int8.pt"):
        assert (tmp_path / "qat" / "export" / name).is_file()
    peak = peak_rss_mb()
    print(f"QAT and export: peak RSS {peak:.0f} MB")
    assert peak < 4096
