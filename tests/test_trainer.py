import math
import pytest
import torch

from conftest import kill_mid_epoch_and_resume
from mpq.checkpoint import load_checkpoint
from mpq.config import recipe_from_dict
from mpq.errors import UsageError
from mpq.trainer import TrainingDiverged, lr_factor, train_fp32


def test_lr_factor_onecycle_and_cosine():
    kw = dict(total_steps=100, warmup_steps=10)
    assert lr_factor(0, schedule="onecycle", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="onecycle", **kw) == pytest.approx(1.0)
    assert lr_factor(55, schedule="onecycle", **kw) == pytest.approx(0.5)
    assert lr_factor(100, schedule="onecycle", **kw) == pytest.approx(0.0)
    assert lr_factor(50, schedule="cosine", **kw) == pytest.approx(0.5)
    assert lr_factor(70, schedule="constant", **kw) == 1.0


def test_tiny_run_learns_and_writes_its_files(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["train"]["epochs"] = 3
    recipe = recipe_from_dict(tiny_recipe_dict)
    metrics = train_fp32(recipe, out_dir=tmp_path / "run", device="cpu", progress=False)
    assert metrics["top1"] > 80  # 4 classes: chance is 25%
    for name in ("model.pt", "checkpoint_last.pt", "metrics.json", "recipe.yaml"):
        assert (tmp_path / "run" / name).is_file()
    assert list((tmp_path / "run" / "tb").glob("events.*"))
    final = load_checkpoint(tmp_path / "run" / "model.pt")
    assert final["normalization"]["mean"] == recipe.data.mean and "optimizer" not in final


def test_same_recipe_reproduces_and_another_recipe_is_refused(tmp_path, tiny_recipe_dict):
    recipe = recipe_from_dict(tiny_recipe_dict)
    train_fp32(recipe, out_dir=tmp_path / "a", device="cpu", progress=False, log=False)
    train_fp32(recipe, out_dir=tmp_path / "b", device="cpu", progress=False, log=False)
    a = load_checkpoint(tmp_path / "a" / "model.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    before = (tmp_path / "a" / "checkpoint_last.pt").read_bytes()
    tiny_recipe_dict["train"]["lr"] = 0.2
    with pytest.raises(UsageError, match="different recipe.*train.lr"):
        train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "a", device="cpu",
                   progress=False)
    assert (tmp_path / "a" / "checkpoint_last.pt").read_bytes() == before


def _one_epoch_run_edited(tmp_path, recipe_dict, edit) -> tuple:
    """A finished one-epoch run in tmp_path/a whose last checkpoint `edit` changed (as an
    older mpq, or a damaged file, left it): (its path, its bytes)."""
    from mpq.checkpoint import save_checkpoint

    recipe_dict["train"]["epochs"] = 1
    train_fp32(recipe_from_dict(recipe_dict), out_dir=tmp_path / "a", device="cpu",
               progress=False, log=False)
    last = tmp_path / "a" / "checkpoint_last.pt"
    state = load_checkpoint(last)
    edit(state)
    save_checkpoint(last, state)
    return last, last.read_bytes()


def _resume(tmp_path, recipe_dict):
    train_fp32(recipe_from_dict(recipe_dict), out_dir=tmp_path / "a", device="cpu",
               progress=False, log=False)


def test_a_field_added_after_a_run_began_blocks_its_resume_only_off_its_default(
        tmp_path, tiny_recipe_dict):
    # as a run that began before train.label_smoothing existed
    last, before = _one_epoch_run_edited(
        tmp_path, tiny_recipe_dict, lambda state: state["recipe"]["train"].pop("label_smoothing"))
    tiny_recipe_dict["train"]["label_smoothing"] = 0.1  # not what that run trained with
    with pytest.raises(UsageError, match="different recipe.*train.label_smoothing"):
        _resume(tmp_path, tiny_recipe_dict)
    assert last.read_bytes() == before
    tiny_recipe_dict["train"]["label_smoothing"] = 0.0  # its default: the same run, resumed
    _resume(tmp_path, tiny_recipe_dict)


def test_a_run_keeps_its_checkpoint_after_the_epochs_named_and_refuses_others(
        tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["train"]["epochs"] = 3
    recipe = recipe_from_dict(tiny_recipe_dict)
    with pytest.raises(UsageError, match=r"--keep-epoch must name epochs in 1\.\.3"):
        train_fp32(recipe, out_dir=tmp_path / "a", device="cpu", progress=False, log=False,
                   keep_epochs=(4,))
    train_fp32(recipe, out_dir=tmp_path / "a", device="cpu", progress=False, log=False,
               keep_epochs=(2,))
    assert sorted(p.name for p in (tmp_path / "a").glob("checkpoint_epoch*")) == [
        "checkpoint_epoch2.pt"]
    kept = load_checkpoint(tmp_path / "a" / "checkpoint_epoch2.pt")
    last = load_checkpoint(tmp_path / "a" / "checkpoint_last.pt")
    assert kept["epoch"] == 1 and last["epoch"] == 2 and len(kept["history"]) == 2
    assert not all(torch.equal(kept["state_dict"][k], last["state_dict"][k])
                   for k in kept["state_dict"])


def test_a_last_checkpoint_missing_a_field_is_refused_by_name_and_kept(tmp_path,
                                                                     tiny_recipe_dict):
    last, before = _one_epoch_run_edited(tmp_path, tiny_recipe_dict,
                                         lambda state: state.pop("optimizer"))
    tiny_recipe_dict["train"]["epochs"] = 2  # a longer run resumes from it
    with pytest.raises(UsageError, match="checkpoint_last.pt is malformed: it has no 'optimizer'"):
        _resume(tmp_path, tiny_recipe_dict)
    assert last.read_bytes() == before


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, tiny_recipe_dict,
                                                           write_recipe):
    tiny_recipe_dict["train"]["epochs"] = 4
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict)], tmp_path)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_recipe_dict):
    from mpq import trainer

    tiny_recipe_dict["train"]["epochs"] = 3
    recipe = recipe_from_dict(tiny_recipe_dict)
    calls = {"n": 0}
    original = trainer._cross_entropy

    def poisoned(label_smoothing):
        inner = original(label_smoothing)

        def loss_fn(model, x, y):
            calls["n"] += 1
            loss, logits, terms = inner(model, x, y)
            return (loss * math.nan if calls["n"] > 14 else loss), logits, terms
        return loss_fn

    trainer._cross_entropy = poisoned
    try:
        with pytest.raises(TrainingDiverged, match="loss became nan at epoch 2"):
            train_fp32(recipe, out_dir=tmp_path / "run", device="cpu", progress=False)
    finally:
        trainer._cross_entropy = original
    kept = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")
    assert kept["epoch"] == 0 and all(torch.isfinite(v).all()
                                      for v in kept["state_dict"].values() if v.is_floating_point())


def test_sigkill_after_a_mid_epoch_checkpoint_resumes_on_the_same_batch(tmp_path,
                                                                        tiny_recipe_dict,
                                                                        write_recipe):
    tiny_recipe_dict["train"].update(epochs=2, checkpoint_steps=4)
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    out = kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict)],
                                    tmp_path, from_partial=True)
    assert "at step" in out


def test_max_steps_ends_training_mid_epoch_with_the_schedule_compressed(tmp_path,
                                                                        tiny_recipe_dict):
    tiny_recipe_dict["train"].update(epochs=50, max_steps=15)   # 12 steps per epoch
    metrics = train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "run",
                         device="cpu", progress=False, log=False)
    assert metrics["steps"] == 15 and metrics["epochs"] == 2
    history = load_checkpoint(tmp_path / "run" / "checkpoint_last.pt")["history"]
    assert [row["steps"] for row in history] == [12, 3]
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # the cosine reached its end


def test_train_images_trains_on_a_fixed_subset(tmp_path, tiny_recipe_dict):
    from mpq.trainer import make_loaders

    tiny_recipe_dict["data"]["train_images"] = 100
    recipe = recipe_from_dict(tiny_recipe_dict)
    a, _ = make_loaders(recipe, device=torch.device("cpu"), progress=False)
    b, _ = make_loaders(recipe, device=torch.device("cpu"), progress=False)
    assert len(a.split) == 100 and len(a) == 3
    assert torch.equal(a.split.images, b.split.images)


def test_bf16_autocast_trains_on_the_cpu_and_fp16_there_is_refused(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["train"].update(epochs=1, precision="bf16", max_steps=3)
    metrics = train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "bf16",
                         device="cpu", progress=False, log=False)
    assert metrics["precision"] == "torch.bfloat16" and math.isfinite(metrics["test_loss"])
    tiny_recipe_dict["train"]["precision"] = "bf16-emulated"
    metrics = train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "emulated",
                         device="cpu", progress=False, log=False)
    assert metrics["precision"] == "bf16-emulated" and math.isfinite(metrics["test_loss"])
    tiny_recipe_dict["train"]["precision"] = "fp16"
    with pytest.raises(UsageError, match="fp16 needs a CUDA GPU"):
        train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "fp16", device="cpu",
                   progress=False, log=False)


def test_compile_runs_the_network_through_torch_compile(tmp_path, tiny_recipe_dict,
                                                        monkeypatch):
    calls = []
    original = torch.compile

    def eager_compile(model, **kwargs):  # dynamo's graph capture without inductor's codegen
        calls.append(model)
        return original(model, backend="eager", **kwargs)

    monkeypatch.setattr(torch, "compile", eager_compile)
    tiny_recipe_dict["train"].update(epochs=1, compile=True, max_steps=3)
    plain = dict(tiny_recipe_dict, train={**tiny_recipe_dict["train"], "compile": False})
    a = train_fp32(recipe_from_dict(tiny_recipe_dict), out_dir=tmp_path / "compiled",
                   device="cpu", progress=False, log=False)
    b = train_fp32(recipe_from_dict(plain), out_dir=tmp_path / "plain", device="cpu",
                   progress=False, log=False)
    assert len(calls) == 1 and a["steps"] == b["steps"] == 3
    sa = load_checkpoint(tmp_path / "compiled" / "model.pt")["state_dict"]
    sb = load_checkpoint(tmp_path / "plain" / "model.pt")["state_dict"]
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-4) for k in sa)


def test_evaluation_runs_contiguous_whatever_the_training_memory_format():
    """A channels_last convolution rounds differently from the contiguous one that `mpq eval`
    and the export run, enough to move a value across a quantizer step (a 13x ResNet20 read
    89.34 against 89.35): evaluation computes contiguously and gives the model back as it was."""
    from torch import nn

    from mpq.trainer import Batches, evaluate

    seen = []

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            seen.append((x.is_contiguous(), self.conv.weight.is_contiguous()))
            return self.conv(x).mean((2, 3))

    model = Net().to(memory_format=torch.channels_last)
    weight = model.conv.weight
    x = torch.randn(8, 3, 6, 6)
    batches = Batches([(x, torch.zeros(8, dtype=torch.long))], torch.device("cpu"),
                      memory_format=torch.channels_last)
    evaluate(model, batches)
    assert seen == [(True, True)]
    assert model.conv.weight is weight and not weight.is_contiguous() and \
        weight.is_contiguous(memory_format=torch.channels_last)
