"""Distillation (`mpq.distill`): the feature term pairs each quantized layer with the teacher's
output at the same point (the BN it folds), measures the error its quantization adds (zero
without it, growing as bits fall), trains the student only, and enters the step's loss with its
weight; a QAT run with it trains and reports it."""

import pytest
import torch

from mpq.distill import (FeatureTaps, distillation_loss, distillation_step_loss, folded_teacher,
                         teacher_points)
from mpq.models import build_model
from mpq.qat import QATConfig, QATRecipe, train_qat
from mpq.quant import calibrate_, prepare_qat, quantizable_layers, uniform_plan


def _teacher():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    model.train()
    with torch.no_grad():  # BN statistics of the data below
        for _ in range(3):
            model(torch.randn(32, 3, 16, 16))
    return model.eval()


def _student(teacher, bits, x):
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=bits)
    student = prepare_qat(teacher, plan, example_inputs=(x[:1],))
    calibrate_(student, [x])
    return student.eval()


def test_each_layer_is_compared_where_its_bn_is_folded():
    teacher = _teacher()
    points = teacher_points(teacher)
    assert points.keys() == set(quantizable_layers(teacher))
    assert points["conv1"] == "bn1" and points["layer1.0.conv2"] == "layer1.0.bn2"
    assert points["fc"] == "fc"  # no BN after it: the layer's own output


def test_the_feature_term_is_the_error_quantization_adds_growing_as_bits_fall():
    teacher = _teacher()
    x = torch.randn(32, 3, 16, 16)
    terms = {}
    for bits in (8, 4, 2):
        student = _student(teacher, bits, x)
        taps = FeatureTaps(teacher, student)
        with torch.no_grad():
            teacher(x), student(x)
        assert not taps.student and not taps.teacher  # an evaluation keeps nothing
        with torch.no_grad(), taps.recording():
            teacher(x), student(x)
        terms[bits] = taps.loss().item()
        taps.remove()
    assert terms[8] < 0.01 < terms[4] < terms[2], terms  # measured 0.004, 0.12, 0.77
    # The layers' own outputs: conv1 of an 8-bit student against bn1 of the teacher by hand.
    student = _student(teacher, 8, x)
    seen = {}
    student.get_submodule("conv1").register_forward_hook(lambda m, a, o: seen.update(s=o))
    teacher.bn1.register_forward_hook(lambda m, a, o: seen.update(t=o))
    taps = FeatureTaps(teacher, student)
    taps.names = ["conv1"]
    with torch.no_grad(), taps.recording():
        teacher(x), student(x)
    want = (seen["s"] - seen["t"]).pow(2).mean() / seen["t"].pow(2).mean()
    assert taps.loss().item() == pytest.approx(want.item(), rel=1e-6)


def test_the_step_loss_adds_the_weighted_term_and_trains_only_the_student():
    teacher = _teacher()
    x, y = torch.randn(16, 3, 16, 16), torch.randint(0, 10, (16,))
    student = _student(teacher, 4, x)
    plain = distillation_step_loss(teacher, QATConfig(), student)
    loss0, _, terms0 = plain(student, x, y)
    assert "feature" not in terms0
    weighted = distillation_step_loss(teacher, QATConfig(feature_weight=2.0), student)
    loss2, _, terms2 = weighted(student, x, y)
    assert loss2.item() == pytest.approx(loss0.item() + 2.0 * terms2["feature"].item(), rel=1e-5)
    loss2.backward()
    assert student.get_submodule("layer1.0.conv1").layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    with pytest.raises(ValueError, match="needs the student"):
        distillation_step_loss(teacher, QATConfig(feature_weight=1.0))


def test_the_teacher_forward_runs_with_bn_folded_and_computes_the_same():
    teacher = _teacher()
    torch.manual_seed(1)
    for bn in (m for m in teacher.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.normal_(0, 0.2)  # statistics of a trained model, not the identity
        bn.running_var.uniform_(0.3, 3.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.normal_(0, 0.2)
    teacher = teacher.to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    folded = folded_teacher(teacher)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert not any(p.requires_grad for p in folded.parameters()) and not folded.training
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want, got = teacher(x), folded(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())  # a copy
    # The step loss distils from the folded teacher: the same loss as from the teacher itself.
    y = torch.randint(0, 10, (8,))
    student = _student(teacher, 4, x)
    loss, _, _ = distillation_step_loss(teacher, QATConfig(), student)(student, x, y)
    with torch.no_grad():
        want_loss, _ = distillation_loss(student(x), teacher(x), y, alpha=0.9, temperature=4.0)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    assert folded_teacher(teacher.train()) is teacher  # training BN is not a fixed function


def test_a_negative_feature_weight_is_refused():
    from mpq.errors import UsageError

    with pytest.raises(UsageError, match="qat.feature_weight"):
        QATConfig(feature_weight=-1.0)


def test_a_qat_run_with_the_feature_term_trains_and_reports_it(tmp_path, tiny_teacher,
                                                               tiny_recipe_dict):
    from mpq.checkpoint import load_checkpoint, model_from_checkpoint
    from mpq.config import recipe_from_dict

    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "feature_weight": 1.0}
    tiny_recipe_dict["train"].update(lr=0.01, max_steps=4)
    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=4)
    train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "qat", device="cpu",
              progress=False, log=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "qat" / "tb"))
    events.Reload()
    (feature,) = events.Scalars("train/feature")
    kd = events.Scalars("train/kd")[0].value
    loss = events.Scalars("train/loss")[0].value
    assert feature.value > 0 and loss == pytest.approx(0.9 * kd + 0.1 * events.Scalars(
        "train/ce")[0].value + feature.value, rel=1e-4)
