"""Sensitivity estimators against the exact Hessian block from torch.autograd.functional."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq.hessian import is_piecewise_linear, layer_sensitivity


def small_net(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6), act(), nn.Linear(6, 3)).eval()
    net[1].running_var.uniform_(0.5, 2)
    net[1].running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(16, 3, 5, 5)
    y = torch.randint(0, 3, (16,))
    return net, [(x[:8], y[:8]), (x[8:], y[8:])], x, y


def true_block(net, name, x, y):
    weight = net.get_submodule(name).weight.detach()

    def loss(w):
        return F.cross_entropy(torch.func.functional_call(net, {f"{name}.weight": w}, (x,)), y)
    h = torch.autograd.functional.hessian(loss, weight).reshape(weight.numel(), -1).double()
    return h.trace().item(), torch.linalg.eigvalsh(h)[-1].item()


LAYERS = ["0", "4", "6"]


def test_piecewise_linear_detection():
    assert is_piecewise_linear(small_net(nn.ReLU)[0])[0]
    linear, reason = is_piecewise_linear(small_net(nn.SiLU)[0])
    assert not linear and "SiLU" in reason


def test_exact_equals_hessian_on_relu_net():
    net, batches, x, y = small_net(nn.ReLU)
    got = layer_sensitivity(net, batches)
    for name in LAYERS:
        trace, top = true_block(net, name, x, y)
        assert got[name].estimator == "exact" and got[name].trace_se == 0
        assert got[name].trace == pytest.approx(trace, rel=1e-4)
        assert got[name].top_eigenvalue == pytest.approx(top, rel=1e-3)


@pytest.mark.parametrize("act, estimator", [
    (nn.ReLU, "hutchinson"), (nn.ReLU, "hutchinson_ggn"),
    (nn.SiLU, "hutchinson"), (nn.SiLU, "hutchinson_ggn"), (nn.SiLU, "auto")])
def test_sampled_estimates_agree_within_their_standard_error(act, estimator):
    net, batches, x, y = small_net(act)
    got = layer_sensitivity(net, batches, estimator=estimator, rel_tol=0.03, max_probes=400)
    for name in LAYERS:
        trace, top = true_block(net, name, x, y)
        s = got[name]
        assert abs(s.trace - trace) <= 3 * s.trace_se + 1e-6 * abs(trace), (name, s, trace)
        assert s.top_eigenvalue == pytest.approx(top, rel=0.01)


def test_control_variate_removes_the_noise_where_hessian_is_gauss_newton():
    # The last layer feeds the loss linearly, so H = G there even in a SiLU network.
    net, batches, _, _ = small_net(nn.SiLU)
    plain = layer_sensitivity(net, batches, estimator="hutchinson", rel_tol=0.05)["6"]
    ggn = layer_sensitivity(net, batches, estimator="hutchinson_ggn", rel_tol=0.05)["6"]
    assert ggn.trace_se < 1e-3 * plain.trace_se and ggn.probes < plain.probes


def test_exact_refuses_a_network_that_is_not_piecewise_linear():
    net, batches, _, _ = small_net(nn.SiLU)
    with pytest.raises(ValueError, match="SiLU"):
        layer_sensitivity(net, batches, estimator="exact")


def test_deflation_needs_fewer_products_and_stays_unbiased():
    # Layer "4" (600 weights): its top directions carry most of the probes' variance. (On the
    # SiLU net the block is indefinite with a trace near zero: both variants run to max_probes.)
    net, batches, x, y = small_net(nn.ReLU)
    trace, _ = true_block(net, "4", x, y)
    plain, deflated, zs = [], [], []
    for seed in range(4):
        kw = dict(layers=["4"], estimator="hutchinson", rel_tol=0.03, seed=seed,
                  top_eigenvalue=False)
        plain.append(layer_sensitivity(net, batches, deflate=0, **kw)["4"].probes)
        s = layer_sensitivity(net, batches, **kw)["4"]
        deflated.append(s.probes)
        zs.append((s.trace - trace) / s.trace_se)
    assert sum(deflated) < 0.8 * sum(plain), (deflated, plain)
    assert all(abs(z) < 3 for z in zs), zs
