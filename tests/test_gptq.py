import copy

import pytest
import torch

from mpq.errors import UsageError
from mpq.models import build_model
from mpq.qat import QATConfig, fine_tune_qat
from mpq.quant import calibrate_, gptq_init_, prepare_qat, quant_layers, quantizable_layers
from mpq.quant import uniform_plan
from mpq.quant.gptq import gptq_round


def _correlated_inputs(d: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    return mix @ torch.randn(d, n, generator=g)  # (D, N), strongly correlated rows


@pytest.mark.parametrize("qmax", [1, 3, 7])
def test_gptq_rounding_cancels_more_output_error_than_rounding_each_weight_alone(qmax):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 48, generator=g)
    x = _correlated_inputs(48, 2000)
    h = x @ x.T / x.shape[1]
    scale = w.abs().amax(1) * 0.8 / qmax
    k = gptq_round(w, h, scale, -qmax, qmax)
    assert torch.equal(k, k.round()) and k.abs().max() <= qmax
    nearest = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax)

    def err(ints):
        return ((w - ints * scale[:, None]) @ x).pow(2).mean()

    assert err(k) < 0.8 * err(nearest)


def test_gptq_rounding_leaves_weights_already_on_the_grid_where_they_are():
    scale = torch.full((4,), 0.5)
    ints = torch.randint(-3, 4, (4, 10), generator=torch.Generator().manual_seed(0)).float()
    x = _correlated_inputs(10, 500)
    assert torch.equal(gptq_round(ints * 0.5, x @ x.T, scale, -3, 3), ints)


def _student(bits: int, seed: int = 0):
    torch.manual_seed(seed)
    teacher = build_model("resnet20", num_classes=10).eval()
    with torch.no_grad():  # BN statistics that are not the identity, as a trained net has
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.2, 0.2)
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=bits)
    x = torch.randn(2, 3, 32, 32)
    student = prepare_qat(copy.deepcopy(teacher), plan, example_inputs=(x,))
    return teacher, student, plan


def test_gptq_init_puts_every_folded_weight_on_its_grid_with_less_output_error():
    teacher, student, _ = _student(2)
    inputs = [torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(i))
              for i in range(2)]
    calibrate_(student, inputs)
    errors = gptq_init_(student, inputs)
    layers = quant_layers(student)
    assert set(errors) == set(layers)
    # conv1 sees i.i.d. noise here: its H is near diagonal and nothing can be cancelled
    assert all(gptq <= nearest * (1 + 1e-6) for nearest, gptq in errors.values())
    assert sum(g for _, g in errors.values()) < 0.5 * sum(n for n, _ in errors.values())
    student.eval()
    for name, layer in layers.items():
        w = layer.effective_weight()
        q = layer.quant_weight(w)
        assert torch.allclose(q, w, atol=1e-6 * w.abs().max().item()), name
    # and the whole student ends closer to its teacher than round-to-nearest's
    _, nearest, _ = _student(2)
    calibrate_(nearest, inputs)
    nearest.eval()
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = teacher(x)
        assert (student(x) - want).pow(2).mean() < (nearest(x) - want).pow(2).mean()


def test_fine_tune_qat_starts_from_gptq_rounding_when_asked():
    teacher, _, plan = _student(3)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g))
               for _ in range(2)]
    train = dict(example_inputs=(batches[0][0][:1],), epochs=1, lr=1e-9)
    plain = fine_tune_qat(teacher, plan, batches, cfg=QATConfig(calibration_batches=2), **train)
    rounded = fine_tune_qat(teacher, plan, batches,
                            cfg=QATConfig(calibration_batches=2, weight_init="gptq"), **train)
    conv = "layer2.0.conv1.layer.weight"
    assert not torch.equal(plain.state_dict()[conv], rounded.state_dict()[conv])


def test_gptq_init_is_refused_beside_frozen_oscillations_and_by_any_other_name():
    with pytest.raises(UsageError, match="freeze_oscillations"):
        QATConfig(weight_init="gptq", freeze_oscillations=0.02)
    with pytest.raises(UsageError, match="nearest or gptq"):
        QATConfig(weight_init="adaround")
