import pytest
import torch

from mpq.quant import ActQuantizer, WeightQuantizer, fake_quantize, mse_optimal_scale, quant_range
from mpq.quant.primitives import round_ste

BITS = [2, 3, 4, 5, 6, 7, 8]


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
def test_quant_range(bits, signed):
    qmin, qmax = quant_range(bits, signed=signed)
    if signed:  # narrow range: symmetric, zero exact
        assert qmin == -qmax and qmax == 2 ** (bits - 1) - 1
    else:
        assert (qmin, qmax) == (0, 2 ** bits - 1)


@pytest.mark.parametrize("bits", [1, 9, 0])
def test_bits_outside_2_to_8_are_refused(bits):
    with pytest.raises(ValueError, match="2..8"):
        quant_range(bits, signed=True)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("mode", ["mse", "max", "lsq"])
@pytest.mark.parametrize("shape", [(8, 3, 3, 3), (5, 7), (4, 1, 3)])
def test_fake_quantized_weights_lie_exactly_on_their_grid(bits, mode, shape):
    torch.manual_seed(bits)
    w = torch.randn(shape) * torch.rand(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    quantizer = WeightQuantizer(bits, shape[0], mode=mode)
    out = quantizer(w)
    scale = quantizer.scale.detach().abs().reshape((-1,) + (1,) * (len(shape) - 1))
    k = torch.round(out / scale)
    qmin, qmax = quant_range(bits, signed=True)
    assert torch.equal(out, k * scale)  # exactly scale * k, bit for bit
    assert k.min() >= qmin and k.max() <= qmax
    assert len(torch.unique(k)) <= qmax - qmin + 1


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed_data", [True, False])
def test_activation_quantizer_grid_and_signedness(bits, signed_data):
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    if not signed_data:
        x = x.relu()
    q = ActQuantizer(bits)
    q.start_calibration()
    q(x)
    q.finish_calibration()
    assert bool(q.signed) == signed_data
    out = q(x)
    k = torch.round(out / q.scale.detach())
    # Unsigned: [0, 2^b - 1]; signed: the full range [-2^(b-1), 2^(b-1) - 1] (an unsigned grid
    # at zero point 2^(b-1) in the int8 runtimes), unlike weights' narrow range.
    qmin, qmax = (-2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed_data else (0, 2 ** bits - 1)
    assert q.qrange == (qmin, qmax)
    assert torch.equal(out, k * q.scale.detach()) and k.min() >= qmin and k.max() <= qmax


def test_uncalibrated_activation_quantizer_refuses():
    with pytest.raises(RuntimeError, match="calibration"):
        ActQuantizer(8)(torch.ones(2))


def test_ste_passes_gradient_inside_and_blocks_outside():
    scale = torch.tensor(0.1)
    qmin, qmax = quant_range(4, signed=True)  # representable range: [-0.7, 0.7]
    x = torch.tensor([-2.0, -0.69, -0.33, 0.0, 0.04, 0.5, 0.68, 0.8, 3.0], requires_grad=True)
    fake_quantize(x, scale, qmin, qmax).sum().backward()
    inside = (x.detach() >= qmin * scale) & (x.detach() <= qmax * scale)
    assert torch.equal(x.grad, inside.float())
    assert inside.tolist() == [False, True, True, True, True, True, True, False, False]
    y = torch.tensor([0.26, 1.7], requires_grad=True)
    round_ste(y).sum().backward()
    assert torch.equal(y.grad, torch.ones(2))


def test_identity_weight_ste_passes_gradient_to_clipped_weights_and_computes_the_same():
    w = torch.randn(6, 3, 3, 3) * 0.2
    out = {}
    for ste in ("clip", "identity"):
        q = WeightQuantizer(2, 6, mode="mse", ste=ste)
        x = w.clone().requires_grad_(True)
        y = q(x)
        y.backward(torch.arange(y.numel(), dtype=torch.float32).reshape(y.shape))
        out[ste] = (y.detach(), x.grad, q.scale.detach().reshape(-1, 1, 1, 1))
    assert torch.equal(out["clip"][0], out["identity"][0])
    upstream = torch.arange(w.numel(), dtype=torch.float32).reshape(w.shape)
    assert torch.equal(out["identity"][1], upstream)
    inside = (w / out["clip"][2]).abs() <= 1  # ternary: qmax 1
    assert 0 < int((~inside).sum()) < w.numel()
    assert torch.equal(out["clip"][1], torch.where(inside, upstream, 0.0))
    with pytest.raises(ValueError, match="lsq"):
        WeightQuantizer(2, 6, mode="lsq", ste="identity")
    with pytest.raises(ValueError, match="fixed scale"):
        fake_quantize(w, torch.tensor(0.1, requires_grad=True), -1, 1, clip_grad=False)


def test_mse_scale_beats_max_at_low_bits_and_matches_brute_force():
    torch.manual_seed(0)
    x = torch.randn(4096)  # Gaussian: clipping the tails pays off at 2-4 bits
    for bits in (2, 3, 4):
        qmin, qmax = quant_range(bits, signed=True)
        s_mse = mse_optimal_scale(x, qmin, qmax, grid=200)
        s_max = x.abs().max() / qmax

        def err(s):
            return (fake_quantize(x, s, qmin, qmax) - x).pow(2).sum()
        assert err(s_mse) < err(s_max)
        ratios = torch.linspace(0.3, 1.0, 200)
        brute = min(err(x.abs().max() * r / qmax) for r in ratios)
        assert err(s_mse) <= brute * (1 + 1e-6)


def test_per_channel_scale_shape():
    w = torch.randn(6, 2, 3, 3)
    scale = mse_optimal_scale(w, -7, 7, dim=0)
    assert scale.shape == (6, 1, 1, 1)
    for c in range(6):
        assert torch.allclose(scale[c].squeeze(), mse_optimal_scale(w[c], -7, 7))


def test_an_mse_quantizer_counts_and_refreshes_only_on_calls_that_train():
    """A read of the grid in training mode under no_grad (logging, calibration) or in eval
    mode is no training step: it neither counts nor refreshes the clipping ratio, so reading
    cannot move training's refreshes."""
    torch.manual_seed(0)
    q = WeightQuantizer(3, 4, mode="mse", refresh_every=1)
    q(torch.randn(4, 64))  # the first training step: the ratio is searched
    ratio = q.ratio.clone()
    heavy = torch.randn(4, 64) ** 3  # heavy tails: a search would clip them harder
    with torch.no_grad():
        q(heavy)
    q.eval()
    q(heavy)
    assert int(q.steps) == 1 and torch.equal(q.ratio, ratio)
    q.train()
    q(heavy)
    assert int(q.steps) == 2 and not torch.equal(q.ratio, ratio)


def test_lsq_scale_receives_gradient():
    w = torch.randn(4, 8)
    q = WeightQuantizer(3, 4, mode="lsq")
    q(w).pow(2).sum().backward()
    assert q.scale.grad is not None and q.scale.grad.abs().sum() > 0


def test_a_weight_that_keeps_flipping_back_is_frozen_at_its_usual_integer():
    # Ternary, max scale 1: the thresholds are at +-0.5. Weight 2 crosses one every step.
    q = WeightQuantizer(2, 1, mode="max", freeze_threshold=0.05, shape=(1, 4))
    q.train()
    steps = 0
    while not bool(q.frozen.any()):
        w = torch.tensor([[1.0, 0.3, 0.49 if steps % 2 == 0 else 0.51, -0.8]], requires_grad=True)
        q(w).sum().backward()
        # The straight-through gradient until the step that freezes it.
        assert w.grad[0, 2] == (0 if bool(q.frozen.any()) else 1)
        steps += 1
        assert steps < 20
    # 1 - 0.99^n > 0.05 after 6 oscillations, the first of which is the second change.
    assert steps == 8
    assert q.frozen.tolist() == [[False, False, True, False]]
    assert q.frozen_int[0, 2] == 0  # the moving average of its integers starts at 0
    w = torch.tensor([[1.0, 0.3, 0.9, -0.8]], requires_grad=True)  # latent now says 1
    out = q(w)
    out.sum().backward()
    assert out.tolist() == [[1.0, 0.0, 0.0, -1.0]]
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 1.0]]  # no gradient to the frozen latent
    assert q.integers(w.detach(), torch.ones(1, 1)).tolist() == [[1.0, 0.0, 0.0, -1.0]]
    q.eval()  # evaluation neither tracks nor unfreezes
    assert q(w.detach()).tolist() == [[1.0, 0.0, 0.0, -1.0]]
    with pytest.raises(ValueError, match="another"):
        q.set_bits(3)


def test_freezing_is_off_by_default_and_leaves_no_state():
    q = WeightQuantizer(2, 3)
    assert "frozen" not in q.state_dict() and q.frozen_fraction() == 0.0
    with pytest.raises(ValueError, match="shape"):
        WeightQuantizer(2, 3, freeze_threshold=0.1)
    with pytest.raises(ValueError, match="threshold"):
        WeightQuantizer(2, 3, freeze_threshold=1.5, shape=(3, 2))
