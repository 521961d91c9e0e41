import pytest
import torch
from torch import nn

from mpq.ema import WeightAverage
from mpq.errors import UsageError
from mpq.trainer import Batches, fit
from mpq.config import Recipe, TrainConfig


def test_the_average_follows_its_formula_and_leaves_integer_state_live():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(net, steps=4)  # decay 0.75, after warm-up
    w0 = net[0].weight.detach().clone()
    want = w0.clone()
    for n in range(3):
        with torch.no_grad():
            net[0].weight.add_(1.0)
        net[1].num_batches_tracked += 1
        avg.update(net)
        d = min(0.75, (1 + n) / (10 + n))
        want = d * want + (1 - d) * net[0].weight.detach()
    live = net[0].weight.detach().clone()
    with avg.applied(net):
        assert torch.allclose(net[0].weight, want)
        assert int(net[1].num_batches_tracked) == 3  # a step count is not averaged
    assert torch.equal(net[0].weight, live)
    with pytest.raises(ValueError, match="time constant"):
        WeightAverage(net, steps=0.5)


def _run(out_dir, ema_epochs):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 3))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 12, generator=g), torch.randint(0, 3, (16,), generator=g))
               for _ in range(4)]
    cfg = TrainConfig(epochs=3, lr=0.1, schedule="constant", warmup_epochs=0,
                      ema_epochs=ema_epochs, channels_last=False)
    loader = Batches(batches, torch.device("cpu"))
    metrics = fit(net, train_loader=loader, test_loader=loader, train_cfg=cfg, out_dir=out_dir,
                  recipe=Recipe(),
                  progress=False, log=False)
    return net, metrics


def test_a_run_that_averages_tests_and_saves_the_average(tmp_path):
    from mpq.checkpoint import load_checkpoint

    plain, plain_metrics = _run(tmp_path / "plain", 0)
    averaged, metrics = _run(tmp_path / "avg", 0.5)
    last = load_checkpoint(tmp_path / "avg" / "checkpoint_last.pt")
    plain_last = load_checkpoint(tmp_path / "plain" / "checkpoint_last.pt")
    # the live weights are tested beside the average: the plain run's figures, epoch by epoch
    assert ([r["live_test_top1"] for r in last["history"]]
            == [r["test_top1"] for r in plain_last["history"]])
    assert metrics["live_top1"] == plain_metrics["top1"] and "live_top1" not in plain_metrics
    saved = load_checkpoint(tmp_path / "avg" / "model.pt")["state_dict"]
    # the run's last weights are those of the plain run (the average does not steer training)
    assert all(torch.equal(last["state_dict"][k], v) for k, v in plain.state_dict().items())
    assert all(torch.equal(saved[k], last["ema"]["average"][k]) for k in saved)
    assert not torch.equal(saved["1.weight"], last["state_dict"]["1.weight"])
    assert all(torch.equal(saved[k], v) for k, v in averaged.state_dict().items())
    # resuming the finished run gives the same model and figures
    again, metrics_again = _run(tmp_path / "avg", 0.5)
    assert all(torch.equal(saved[k], v) for k, v in again.state_dict().items())
    assert metrics_again["top1"] == metrics["top1"]


def test_a_run_without_an_average_is_not_resumed_with_one(tmp_path):
    _run(tmp_path / "run", 0)
    with pytest.raises(UsageError, match="without train.ema_epochs"):
        _run(tmp_path / "run", 0.5)
    with pytest.raises(UsageError, match="ema_epochs must be >= 0"):
        TrainConfig(ema_epochs=-1)


def test_an_averaging_qat_run_killed_mid_epoch_resumes_exactly(tmp_path, tiny_teacher,
                                                               tiny_recipe_dict, write_recipe):
    from conftest import kill_mid_epoch_and_resume

    tiny_recipe_dict["train"].update(epochs=3, ema_epochs=0.5)
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict),
                               "--teacher", tiny_teacher, "--bits", "3", "--no-export"], tmp_path)


def test_an_averaging_qat_run_re_estimates_bn_for_the_average(tmp_path, tiny_teacher,
                                                               tiny_recipe_dict, capsys):
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.config import recipe_from_dict
    from mpq.qat import QATRecipe, train_qat
    from mpq.quant import quantizable_layers, uniform_plan

    tiny_recipe_dict["train"].update(epochs=2, lr=0.01, ema_epochs=0.5)
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=4)
    bare = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    train_qat(bare, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "bare", device="cpu",
              progress=False, log=True)
    assert "set qat.bn_reestimate_batches" in capsys.readouterr().out
    tiny_recipe_dict["qat"]["bn_reestimate_batches"] = 2
    metrics = train_qat(recipe_from_dict(tiny_recipe_dict, QATRecipe), plan=plan,
                        teacher=tiny_teacher, out_dir=tmp_path / "qat", device="cpu",
                        progress=False, log=True)
    assert "set qat.bn_reestimate_batches" not in capsys.readouterr().out
    last = load_checkpoint(tmp_path / "qat" / "checkpoint_last.pt")
    saved = load_checkpoint(tmp_path / "qat" / "model.pt")["state_dict"]
    average = last["ema"]["average"]
    # the saved model is the average, with BN's statistics (and only those) recomputed
    stats = [k for k in average if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(saved[k], average[k]) for k in stats)
    # (a weight quantizer's `scale` is not state: each forward derives it from the folded weight)
    kept = [k for k in average if k not in stats and not k.endswith("weight_quant.scale")]
    assert all(torch.equal(saved[k], average[k]) for k in kept)
    assert metrics["top1_before_bn_reestimate"] == last["history"][-1]["test_top1"]
