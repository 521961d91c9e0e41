"""Bad input through the scripts: one clear line on stderr, exit code 2, nothing overwritten."""

import pytest
import torch
import yaml

from conftest import run_script
from mpq.checkpoint import save_checkpoint
from mpq.models import build_model


def assert_usage_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture
def tiny_args(tmp_path, tiny_recipe_dict, write_recipe):
    def make(**sections):
        for section, values in sections.items():
            tiny_recipe_dict.setdefault(section, {}).update(values)
        return ["train.py", "--recipe", write_recipe(tiny_recipe_dict), "--device", "cpu",
                "--quiet", "--out", tmp_path / "run"]
    return make


def test_unknown_recipe_key_suggests(tiny_args, tmp_path):
    result = run_script(*tiny_args(train={"lr_max": 0.1}))
    assert_usage_error(result, "unknown recipe key 'train.lr_max'", "did you mean 'train.lr'")
    assert not (tmp_path / "run").exists()


def test_wrong_value_type(tiny_args):
    assert_usage_error(run_script(*tiny_args(train={"epochs": "ten"})),
                       "train.epochs: expected int")


def test_override_typo(tiny_args):
    assert_usage_error(run_script(*tiny_args(), "--set", "train.epoch=3"),
                       "did you mean 'train.epochs'")


def test_missing_data_root_and_wrong_layout(tiny_args, tmp_path):
    args = tiny_args(data={"dataset": "imagefolder"})
    assert_usage_error(run_script(*args, "--data-root", tmp_path / "nowhere"),
                       "does not exist", "train/<class>")
    (tmp_path / "flat").mkdir()
    assert_usage_error(run_script(*args, "--data-root", tmp_path / "flat"), "no train/ folder")
    assert not (tmp_path / "run").exists()


def test_existing_run_of_another_recipe_is_not_overwritten(tiny_args, tmp_path):
    assert run_script(*tiny_args(train={"epochs": 1})).returncode == 0
    before = (tmp_path / "run" / "model.pt").read_bytes()
    result = run_script(*tiny_args(train={"epochs": 2}))
    assert_usage_error(result, "different recipe", "train.epochs")
    assert (tmp_path / "run" / "model.pt").read_bytes() == before


def test_eval_prints_top1_last(tiny_args, tmp_path):
    assert run_script(*tiny_args(train={"epochs": 1})).returncode == 0
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "run" / "model.pt",
                        "--quiet")
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("top1=") and 0 <= float(last[5:]) <= 100
    train = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "run" / "model.pt",
                       "--split", "train", "--quiet")
    assert train.returncode == 0, train.stderr
    images = dict(line.split()[:2] for out in (result.stdout, train.stdout)
                  for line in out.splitlines() if line.startswith("split="))
    recipe = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())["data"]
    assert images == {"split=test": f"images={recipe['synthetic_test_size']}",
                      "split=train": f"images={recipe['synthetic_train_size']}"}


def test_eval_bad_checkpoints(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04 truncated")
    assert_usage_error(run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "junk.pt"),
                       "corrupted")
    assert_usage_error(run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "none.pt"),
                       "does not exist")
    wrong = {"model": {"name": "resnet20", "num_classes": 10},
             "state_dict": build_model("resnet18", num_classes=10).state_dict(),
             "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "recipe": {"data": {}}}
    save_checkpoint(tmp_path / "wrong.pt", wrong)
    assert_usage_error(run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "wrong.pt"),
                       "does not fit the model")
    no_plan = {**wrong, "kind": "qat"}  # the right format, a key missing
    save_checkpoint(tmp_path / "no_plan.pt", no_plan)
    assert_usage_error(run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "no_plan.pt"),
                       f"checkpoint {tmp_path / 'no_plan.pt'} is malformed: it has no 'plan'")


def test_wrap_turns_a_state_dict_into_a_checkpoint_and_eval_reads_one_without_recipe(
        tmp_path, tiny_recipe_dict, write_recipe):
    from imagenet_layout import make_imagenet_layout
    from mpq.checkpoint import load_checkpoint

    torch.manual_seed(0)
    net = build_model("resnet20", num_classes=4)
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    recipe = write_recipe(tiny_recipe_dict)
    args = ["-m", "mpq", "wrap", "--state-dict", tmp_path / "sd.pt", "--recipe", recipe,
            "--out", tmp_path / "wrapped.pt"]
    result = run_script(*args)
    assert result.returncode == 0, result.stderr
    wrapped = load_checkpoint(tmp_path / "wrapped.pt")
    assert wrapped["kind"] == "fp32" and wrapped["recipe"]["data"]["dataset"] == "synthetic"
    assert torch.equal(wrapped["state_dict"]["fc.weight"], net.state_dict()["fc.weight"])
    again = run_script(*args)
    assert again.returncode == 2 and "--force" in again.stderr
    # A whole pickled module runs code when loaded: refused, then read on the explicit opt-in.
    torch.save(net, tmp_path / "module.pt")
    pickled = ["-m", "mpq", "wrap", "--state-dict", tmp_path / "module.pt", "--recipe", recipe,
               "--out", tmp_path / "from_pickle.pt"]
    refused = run_script(*pickled)
    assert refused.returncode == 2 and "--allow-pickle" in refused.stderr, refused.stderr
    assert not (tmp_path / "from_pickle.pt").exists()
    assert run_script(*pickled, "--allow-pickle").returncode == 0
    assert torch.equal(load_checkpoint(tmp_path / "from_pickle.pt")["state_dict"]["fc.weight"],
                       net.state_dict()["fc.weight"])
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "wrapped.pt")
    assert result.returncode == 0 and "top1=" in result.stdout, result.stderr

    # Wrapped by hand with no recipe: the defaults at its input size, on any ImageFolder root.
    root = make_imagenet_layout(tmp_path / "data", classes=4, train_per_class=1,
                                val_per_class=3, sizes=(12, 16), name="class{}")
    save_checkpoint(tmp_path / "bare.pt", {"kind": "fp32",
                                           "model": {"name": "resnet20", "num_classes": 4},
                                           "input_size": 12, "state_dict": net.state_dict()})
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "bare.pt",
                        "--data-root", root)
    assert result.returncode == 0 and "images=12" in result.stdout, result.stderr
