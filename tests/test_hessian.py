"""Sensitivity estimators against brute-force Hessian and Gauss-Newton blocks (from
torch.autograd.functional) on small networks: piecewise linear ones, smooth ones, a shared
conv, `h * h`, a sigmoid gate, a residual block."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import UsageError
from mpq.hessian import is_piecewise_linear, layer_sensitivity
from mpq.hessian.ggn import exact_ggn_bytes
from mpq.hessian.linearity import layer_linearity


def small_net(act):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), act(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6), act(), nn.Linear(6, 3)).eval()
    net[1].running_var.uniform_(0.5, 2)
    net[1].running_mean.uniform_(-0.2, 0.2)
    x = torch.randn(16, 3, 5, 5)
    y = torch.randint(0, 3, (16,))
    return net, [(x[:8], y[:8]), (x[8:], y[8:])], x, y


class SharedConv(nn.Module):
    """One conv applied twice: the logits are quadratic in its weight."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.shared = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.shared(torch.relu(self.stem(x))))
        return self.fc(torch.relu(self.shared(h)).mean((2, 3)))


class Square(nn.Module):
    """A layer feeding `h * h`."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x)
        return self.fc((h * h).mean((2, 3)))


class Gate(nn.Module):
    """Squeeze-excitation style: a(s) * b(s), both depending on the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.se = nn.Linear(4, 4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        gate = torch.sigmoid(self.se(h.mean((2, 3))))
        return self.fc((h * gate[:, :, None, None]).mean((2, 3)))


class Residual(nn.Module):
    """A ResNet block: additions, a shortcut, x * constant; piecewise linear everywhere."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.relu(self.bn(self.b(h)) + h) * 0.5
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


def data(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return [(x[: n // 2], y[: n // 2]), (x[n // 2:], y[n // 2:])], x, y


def brute(net, name, x, y):
    """(trace, top eigenvalue) of the Hessian and of the Gauss-Newton block, by brute force."""
    weight = net.get_submodule(name).weight.detach()

    def logits(w):
        return torch.func.functional_call(net, {f"{name}.weight": w}, (x,))

    h = torch.autograd.functional.hessian(lambda w: F.cross_entropy(logits(w), y), weight)
    h = h.reshape(weight.numel(), -1).double()
    jac = torch.autograd.functional.jacobian(logits, weight).reshape(len(x), -1,
                                                                     weight.numel()).double()
    p = F.softmax(logits(weight), 1).double()
    hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    g = torch.einsum("nci,ncd,ndj->ij", jac, hout, jac) / len(x)
    return ((h.trace().item(), torch.linalg.eigvalsh(h)[-1].item()),
            (g.trace().item(), torch.linalg.eigvalsh(g)[-1].item()))


NETS = {"relu": lambda: small_net(nn.ReLU)[0], "silu": lambda: small_net(nn.SiLU)[0],
        "shared": SharedConv, "square": Square, "gate": Gate, "residual": Residual}
CURVED = {  # layer -> what the graph must name, per network (absent: piecewise linear)
    "relu": {}, "silu": {"0": "SiLU", "4": "SiLU"},
    "shared": {"shared": "called 2 times"},  # stem feeds it linearly: stem stays exact
    "square": {"conv": "multiplies two tensors"}, "gate": {"conv": "sigmoid", "se": "sigmoid"},
    "residual": {}}


def make(kind):
    torch.manual_seed(1)
    net = NETS[kind]().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2)
    return net


@pytest.mark.parametrize("kind", NETS)
def test_the_graph_tells_which_layers_have_hessian_equal_to_gauss_newton(kind):
    net = make(kind)
    layers = [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    found = layer_linearity(net, layers)
    for name in layers:
        expect = CURVED[kind].get(name)
        if expect is None:
            assert found[name] is None, (name, found[name])
        else:
            assert found[name] and expect in found[name], (name, found[name])
    assert is_piecewise_linear(net)[0] == (not CURVED[kind])


@pytest.mark.parametrize("kind", NETS)
def test_auto_is_exact_where_it_says_so_and_names_the_gauss_newton_block_elsewhere(kind):
    net = make(kind)
    batches, x, y = data()
    got = layer_sensitivity(net, batches)
    for name, s in got.items():
        (h_trace, h_top), (g_trace, g_top) = brute(net, name, x, y)
        assert s.trace_se == 0 and s.top_eigenvalue_se == 0
        if name in CURVED[kind]:
            assert (s.estimator, s.quantity) == ("exact_ggn", "ggn") and s.curved_by
            trace, top = g_trace, g_top
        else:
            assert (s.estimator, s.quantity, s.curved_by) == ("exact", "hessian", None)
            assert h_trace == pytest.approx(g_trace, rel=1e-5)  # what makes it exact
            trace, top = h_trace, h_top
        assert s.trace == pytest.approx(trace, rel=1e-4, abs=1e-9), (name, s, trace)
        assert s.top_eigenvalue == pytest.approx(top, rel=1e-3, abs=1e-9), (name, s, top)


@pytest.mark.parametrize("draws", ["signs", "labels"])
@pytest.mark.parametrize("kind", NETS)
def test_sampling_agrees_with_the_gauss_newton_block_within_its_errors(kind, draws):
    net = make(kind)
    batches, x, y = data()
    got = layer_sensitivity(net, batches, estimator="sampled", rel_tol=0.02, min_draws=16,
                            draws=draws)
    for name, s in got.items():
        _, (trace, top) = brute(net, name, x, y)
        assert s.estimator == "sampled" and s.trace_se > 0 and s.probes >= 16
        assert s.trace_se <= 0.02 * s.trace + 1e-12
        assert abs(s.trace - trace) <= 3 * s.trace_se, (name, s, trace)
        # the Rayleigh quotient of the power-iterated direction, measured on a fresh draw
        assert abs(s.top_eigenvalue - top) <= 3 * s.top_eigenvalue_se + 0.1 * top, (name, s, top)


@pytest.mark.parametrize("kind", ["silu", "shared", "square", "gate"])
def test_hutchinson_with_the_control_variate_finds_the_hessian_where_it_differs(kind):
    net = make(kind)
    batches, x, y = data()
    got = layer_sensitivity(net, batches, estimator="hutchinson_ggn", rel_tol=0.03,
                            max_probes=400)
    for name in CURVED[kind]:
        (trace, top), _ = brute(net, name, x, y)
        s = got[name]
        assert s.quantity == "hessian"
        assert abs(s.trace - trace) <= 3 * s.trace_se + 1e-6 * abs(trace), (name, s, trace)
        assert s.top_eigenvalue == pytest.approx(top, rel=0.01, abs=1e-6)


def test_plain_hutchinson_agrees_within_its_standard_error():
    net, batches, x, y = small_net(nn.SiLU)
    got = layer_sensitivity(net, batches, estimator="hutchinson", rel_tol=0.03, max_probes=400)
    for name in ["0", "4", "6"]:
        (trace, top), _ = brute(net, name, x, y)
        assert abs(got[name].trace - trace) <= 3 * got[name].trace_se + 1e-6 * abs(trace)
        assert got[name].top_eigenvalue == pytest.approx(top, rel=0.01)


def test_control_variate_removes_the_noise_where_hessian_is_gauss_newton():
    # The last layer feeds the loss linearly, so H = G there even in a SiLU network.
    net, batches, _, _ = small_net(nn.SiLU)
    plain = layer_sensitivity(net, batches, estimator="hutchinson", rel_tol=0.05)["6"]
    ggn = layer_sensitivity(net, batches, estimator="hutchinson_ggn", rel_tol=0.05)["6"]
    assert ggn.trace_se < 1e-3 * plain.trace_se and ggn.probes < plain.probes


def test_exact_refuses_a_layer_whose_hessian_is_not_its_gauss_newton_block():
    for kind, name in [("silu", "SiLU"), ("shared", "called 2 times")]:
        batches, _, _ = data()
        with pytest.raises(UsageError, match=name):
            layer_sensitivity(make(kind), batches, estimator="exact")


def test_the_memory_bound_changes_how_not_what():
    net = make("residual")
    batches, _, _ = data()
    roomy = layer_sensitivity(net, batches)
    largest = max(exact_ggn_bytes(s.numel, 16, 3) for s in roomy.values())
    tight = layer_sensitivity(net, batches, memory_bytes=largest)  # about a group per layer
    for name in roomy:
        assert tight[name].estimator == "exact"
        assert tight[name].trace == pytest.approx(roomy[name].trace, rel=1e-6)
        assert tight[name].top_eigenvalue == pytest.approx(roomy[name].top_eigenvalue, rel=1e-5)
    # Too tight for a layer's rows: auto samples that layer instead, one sample at a time.
    sampled = layer_sensitivity(net, batches, memory_bytes=500, rel_tol=0.03)
    assert {s.estimator for s in sampled.values()} == {"sampled"}
    for name in roomy:
        s = sampled[name]
        assert abs(s.trace - roomy[name].trace) <= 3 * s.trace_se


@pytest.mark.parametrize("draw", ["signs", "labels"])
def test_each_draw_has_the_softmax_fisher_as_its_covariance(draw):
    from mpq.hessian.ggn import _fisher_draw

    p = torch.softmax(torch.tensor([[2.0, 0.5, -1.0, 0.0], [6.0, -2.0, 0.0, 1.0]]).double(), 1)
    gen = torch.Generator().manual_seed(0)
    k = 40000
    u = torch.stack([_fisher_draw(p, draw, gen) for _ in range(k)])           # (k, 2, 4)
    covariance = torch.einsum("kni,knj->nij", u, u) / k
    fisher = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    assert torch.allclose(u.sum(-1), torch.zeros(k, 2, dtype=p.dtype), atol=1e-12)
    assert (covariance - fisher).abs().max() < 5 * fisher.abs().max() / k ** 0.5


def test_signs_need_far_fewer_draws_than_labels_where_predictions_are_confident():
    """A confident model leaves the label trace to rare draws of unlikely labels (the random-init
    resnet50 case); signs weigh every class in every draw."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 40)).eval()
    with torch.no_grad():
        net[3].weight.mul_(100)
    batches = [(torch.randn(16, 3, 5, 5), torch.zeros(16, dtype=torch.long))]
    with torch.no_grad():
        assert torch.softmax(net(batches[0][0]), 1).max(1).values.mean() > 0.9
    exact = layer_sensitivity(net, batches, max_exact_classes=40)
    found = {draws: layer_sensitivity(net, batches, estimator="sampled", rel_tol=0.05,
                                      max_draws=4096, draws=draws, top_eigenvalue=False)
             for draws in ("signs", "labels")}
    for name, e in exact.items():
        signs, labels = found["signs"][name], found["labels"][name]
        assert abs(signs.trace - e.trace) <= 3 * signs.trace_se
        assert abs(labels.trace - e.trace) <= 3 * labels.trace_se
        assert 3 * signs.probes <= labels.probes, (name, signs.probes, labels.probes)


def test_many_classes_are_sampled_and_few_are_exact():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(36, 40)).eval()
    batches = [(torch.randn(8, 3, 5, 5), torch.randint(0, 40, (8,)))]
    assert {s.estimator for s in layer_sensitivity(net, batches).values()} == {"sampled"}
    exact = layer_sensitivity(net, batches, max_exact_classes=40)
    assert {s.estimator for s in exact.values()} == {"exact"}
    sampled = layer_sensitivity(net, batches, rel_tol=0.03)
    for name, s in sampled.items():
        assert abs(s.trace - exact[name].trace) <= 3 * s.trace_se


def test_deflation_needs_fewer_products_and_stays_unbiased():
    # Layer "4" (600 weights): its top directions carry most of the probes' variance.
    net, batches, x, y = small_net(nn.ReLU)
    (trace, _), _ = brute(net, "4", x, y)
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
