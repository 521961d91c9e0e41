"""The numerical check of the graph's `exact` labels (`mpq.hessian.exactness`), against
brute-force Hessian and Gauss-Newton blocks (torch.autograd.functional) of small layers.

FOOLED are graphs the allow-list of `linearity` calls piecewise linear in a layer whose Hessian
block is not its Gauss-Newton block (`test_the_graph_alone_calls_them_exact` proves both; if
the graph learns to see one, move it to test_hessian's CURVED). CLEAN are piecewise-linear
ones, which must stay exact."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpq.errors import UsageError
from mpq.hessian import is_piecewise_linear, layer_sensitivity
from mpq.hessian.exactness import EXACT_REL_TOL, _prepared, curvature_gaps
from mpq.hessian.linearity import layer_linearity


class Reciprocal(nn.Module):
    """A scalar divided by a tensor that depends on the conv."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc((1.0 / (1.0 + F.relu(self.conv(x)))).mean((2, 3)))


class WeightNorm(nn.Module):
    """The conv's weight read again as an attribute: features over its norm."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.conv(x)).mean((2, 3)) / self.conv.weight.norm())


class TiedHead(nn.Module):
    """Weight tying: a slice of fc1's weight is also the weight of an output projection."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(75, 3)
        self.fc2 = nn.Linear(3, 3)

    def forward(self, x):
        h = F.relu(self.fc1(x.flatten(1)))                                # (N, 3)
        return F.linear(h, self.fc1.weight[:, :3]) + self.fc2(h)


class SelfSimilarity(nn.Module):
    """`F.linear` with both arguments from the conv: each sample's features against the
    batch's mean features."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        h = F.relu(self.conv(x)).mean((2, 3))                             # (N, 4)
        centre = h.mean(0, keepdim=True)                                  # (1, 4)
        return F.linear(h, torch.cat([centre, -centre, 2 * centre]))      # (N, 3)


class BatchStats(nn.Module):
    """An allow-listed BN that normalises by the batch's own statistics, even in eval mode."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, track_running_stats=False)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean((2, 3)))


class InPlace(nn.Module):
    """`h * h` in disguise: h is added in place into a tensor the graph does not follow."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = self.conv(x).mean((2, 3))
        acc = x.new_zeros(x.shape[0], 4)
        acc.add_(h)
        return self.fc(acc * h)


class ConvBnReluLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc1 = nn.Linear(4 * 5 * 5, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x))).flatten(1)
        return self.fc2(F.relu(self.fc1(h)))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = F.max_pool2d(torch.relu(self.bn(self.b(h)) + h), 2)
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))


class TwoBranchProduct(nn.Module):
    """Each branch's layer enters the product once: every diagonal block is exact, but the
    cross-layer block is curved, so the joint product flags them and each is cleared alone."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(F.relu(self.a(x)).mean((2, 3)) * F.relu(self.b(x)).mean((2, 3)))


FOOLED = {  # graph -> the layer it wrongly calls exact
    "reciprocal": (Reciprocal, "conv"), "weight_norm": (WeightNorm, "conv"),
    "tied_head": (TiedHead, "fc1"), "self_similarity": (SelfSimilarity, "conv"),
    "batch_stats": (BatchStats, "conv"), "in_place": (InPlace, "conv")}
CLEAN = {"conv_bn_relu_linear": ConvBnReluLinear, "residual": Residual,
         "two_branch_product": TwoBranchProduct}
GRAPHS = {**{k: c for k, (c, _) in FOOLED.items()}, **CLEAN}


def make(kind):
    torch.manual_seed(1)
    net = GRAPHS[kind]().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d) and m.track_running_stats:
            m.running_var.uniform_(0.5, 2)
            m.running_mean.uniform_(-0.2, 0.2)
    return net


def data(n=16):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def layers_of(net):
    return [n for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def blocks(net, names, x, y):
    """Brute-force Hessian and Gauss-Newton matrices of the mean cross-entropy over the
    weights of `names` jointly (float64, n x n)."""
    weights = tuple(net.get_submodule(n).weight.detach() for n in names)

    def logits(*ws):
        return torch.func.functional_call(net, {f"{n}.weight": w for n, w in zip(names, ws)},
                                          (x,))

    def flat(parts):  # nested tuples of blocks -> one matrix
        return torch.cat([torch.cat([b.reshape(wi.numel(), wj.numel()) for b, wj in
                                     zip(row, weights)], 1) for row, wi in zip(parts, weights)])

    h = torch.autograd.functional.hessian(lambda *ws: F.cross_entropy(logits(*ws), y), weights)
    jac = torch.autograd.functional.jacobian(logits, weights)
    jac = torch.cat([j.reshape(len(x), -1, w.numel()) for j, w in zip(jac, weights)], 2)
    p = F.softmax(logits(*weights), 1).double()
    hout = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    g = torch.einsum("nci,ncd,ndj->ij", jac.double(), hout, jac.double()) / len(x)
    return flat(h).double(), g


def curved(net, name, x, y) -> float:
    """||H_ii - G_ii|| / ||H_ii|| by brute force."""
    h, g = blocks(net, [name], x, y)
    return ((h - g).norm() / h.norm()).item()


@pytest.mark.parametrize("kind", FOOLED)
def test_the_graph_alone_calls_them_exact(kind):
    net, (_, name) = make(kind), FOOLED[kind]
    x, y = data()
    assert layer_linearity(net, layers_of(net))[name] is None
    assert is_piecewise_linear(net) == (True, "piecewise linear")
    assert curved(net, name, x, y) > 0.1                 # yet the Hessian block is not G's


@pytest.mark.parametrize("kind", GRAPHS)
def test_the_check_flags_a_layer_exactly_when_its_hessian_block_is_not_gauss_newton(kind):
    net = make(kind)
    x, y = data()
    gaps = curvature_gaps(net, layers_of(net), x[:8], y[:8])
    for name, gap in gaps.items():
        truth = curved(net, name, x[:8], y[:8])
        assert (gap > EXACT_REL_TOL) == (truth > 1e-3), (name, gap, truth)
        assert truth < 1e-5 or truth > 0.1, (name, truth)  # no borderline case in these
    if kind in FOOLED:
        assert gaps[FOOLED[kind][1]] > 0.1


def test_the_joint_product_flags_cross_layer_curvature_and_each_layer_is_cleared_alone():
    net = make("two_branch_product")
    x, y = data()
    names = layers_of(net)
    joint = curvature_gaps(net, names, x, y, rel_tol=float("inf"))   # never checked alone
    assert joint["a"] > 0.01 and joint["b"] > 0.01
    assert max(curvature_gaps(net, names, x, y).values()) <= EXACT_REL_TOL


@pytest.mark.parametrize("kind", ["conv_bn_relu_linear", "residual", "reciprocal"])
def test_local_forwards_keep_each_diagonal_block_and_drop_only_cross_layer_products(kind):
    """The copy the check runs on: every diagonal block of its Hessian is the model's, and in
    a piecewise-linear model its whole Hessian is the Gauss-Newton matrix."""
    net = make(kind)
    local = _prepared(net, layers_of(net))
    x, y = data()
    names = layers_of(net)
    h_net, g_net = blocks(net, names, x, y)
    h_local, g_local = blocks(local, names, x, y)
    assert torch.allclose(g_local, g_net, rtol=1e-5, atol=1e-9)
    start = 0
    for name in names:
        n = net.get_submodule(name).weight.numel()
        at = slice(start, start + n)
        assert torch.allclose(h_local[at, at], h_net[at, at], rtol=1e-4, atol=1e-7), name
        start += n
    if kind in CLEAN:
        assert (h_net - g_net).norm() > 1e-3 * h_net.norm()   # the cross blocks of the model
        assert torch.allclose(h_local, g_local, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("kind", FOOLED)
def test_layer_sensitivity_relabels_what_the_graph_gets_wrong_and_says_so(kind):
    net, (_, wrong) = make(kind), FOOLED[kind]
    x, y = data()
    with pytest.warns(UserWarning, match="curved_by 'numerical check'") as caught:
        got = layer_sensitivity(net, [(x[:8], y[:8]), (x[8:], y[8:])])
    assert any(f"{wrong} (" in str(w.message) for w in caught)
    for name, s in got.items():
        record = s.to_dict()
        if name == wrong:
            assert (record["estimator"], record["quantity"], record["curved_by"]) == (
                "exact_ggn", "ggn", "numerical check")
        else:  # the head: its Hessian block is its Gauss-Newton block
            assert curved(net, name, x, y) < 1e-5
            assert (record["estimator"], record["quantity"], record["curved_by"]) == (
                "exact", "hessian", None)


@pytest.mark.parametrize("kind", CLEAN)
def test_piecewise_linear_layers_stay_exact_without_a_warning(kind):
    net = make(kind)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = layer_sensitivity(net, [(x[:8], y[:8]), (x[8:], y[8:])])
        assert is_piecewise_linear(net, batch=(x, y)) == (True, "piecewise linear")
    for name, s in got.items():
        assert curved(net, name, x, y) < 1e-5
        assert (s.estimator, s.quantity, s.curved_by) == ("exact", "hessian", None)


def test_the_exact_estimator_and_is_piecewise_linear_refuse_what_the_check_finds():
    net = make("reciprocal")
    x, y = data()
    with pytest.warns(UserWarning, match="numerical check"):
        assert is_piecewise_linear(net, batch=(x, y)) == (False, "conv: numerical check")
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="numerical check"):
        layer_sensitivity(net, [(x, y)], estimator="exact")


def test_where_the_check_cannot_run_nothing_is_proven(monkeypatch):
    import mpq.hessian.exactness as exactness

    def no_double_backward(*args, **kwargs):
        raise RuntimeError("the derivative for 'some_op' is not implemented")

    monkeypatch.setattr(exactness, "curvature_gaps", no_double_backward)
    x, y = data()
    with pytest.warns(UserWarning, match="numerical check could not run"):
        got = layer_sensitivity(make("conv_bn_relu_linear"), [(x, y)])
    assert all(s.quantity == "ggn" and s.curved_by.startswith("numerical check could not run")
               for s in got.values())
