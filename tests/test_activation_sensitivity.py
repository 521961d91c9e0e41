"""The activation side of the sensitivity (mpq.hessian.activation): each layer's input-curvature
trace per image against a brute-force Hessian, and the perturbation it weighs."""

import torch
import torch.nn.functional as F
from torch import nn

from mpq.hessian.activation import activation_perturbations, activation_traces


class Net(nn.Module):
    """conv -> relu -> conv (called twice) -> relu -> linear: piecewise linear after every
    input, so the Gauss-Newton block in each input is its Hessian block."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = F.relu(self.b(F.relu(self.b(h))))
        return self.fc(h.flatten(1))


def _brute_force_traces(model, x, y):
    """tr of d^2 loss_n / d input^2 of every layer call, per image, by autograd.functional."""
    out = {}
    inputs = {}
    hooks = [getattr(model, n).register_forward_hook(
        lambda m, a, o, n=n: inputs.setdefault(n, []).append(a[0].detach()))
        for n in ("a", "b", "fc")]
    model(x)
    for h in hooks:
        h.remove()
    for name, calls in inputs.items():
        out[name] = []
        for call, x_in in enumerate(calls):
            per_image = []
            for n in range(len(x)):
                def loss_of(v, n=n):
                    seen = [0]

                    def swap(m, a):
                        seen[0] += 1
                        if seen[0] == call + 1:
                            return (v.unsqueeze(0),)
                    handle = getattr(model, name).register_forward_pre_hook(swap)
                    try:
                        return F.cross_entropy(model(x[n:n + 1]), y[n:n + 1])
                    finally:
                        handle.remove()
                hess = torch.autograd.functional.hessian(loss_of, x_in[n])
                per_image.append(hess.reshape(x_in[n].numel(), -1).diagonal().sum().item())
            out[name].append(torch.tensor(per_image, dtype=torch.float64))
    return out


def test_input_traces_are_the_hessians_per_image_and_call():
    torch.manual_seed(0)
    model = Net().double().eval()
    x, y = torch.randn(3, 2, 4, 4, dtype=torch.float64), torch.tensor([0, 2, 3])
    traces, inputs = activation_traces(model.float(), ["a", "b", "fc"],
                                       [(x.float(), y)])
    want = _brute_force_traces(model.double(), x, y)
    assert [len(traces[n]) for n in ("a", "b", "fc")] == [1, 2, 1]  # b is called twice
    for name in want:
        for got, expected in zip(traces[name], want[name]):
            assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7), (name, got, expected)
    assert inputs["b"][1].shape == (3, 3, 4, 4)


def test_perturbation_falls_with_bits_and_weighs_the_rounding_by_the_curvature():
    torch.manual_seed(0)
    model = Net().eval()
    batches = [(torch.randn(8, 2, 4, 4), torch.randint(0, 4, (8,)))]
    traces, inputs = activation_traces(model, ["a", "b", "fc"], batches)
    omega = activation_perturbations(traces, inputs, [2, 4, 8])
    for name in omega:
        assert omega[name][2] > omega[name][4] > omega[name][8] > 0
    doubled = activation_perturbations({n: [2 * t for t in c] for n, c in traces.items()},
                                       inputs, [4])
    assert all(abs(doubled[n][4] - 2 * omega[n][4]) < 1e-9 * omega[n][4] for n in omega)


def test_sampled_traces_are_unbiased_and_stop_at_their_tolerance():
    """With random draws each image's trace is an unbiased estimate of the exact one: over many
    draws the mean matches it (per layer call, within 3 standard errors of the draws' own
    spread), and a loose tolerance stops at min_draws while a tight one draws more."""
    torch.manual_seed(0)
    model = Net().eval()
    batches = [(torch.randn(6, 2, 4, 4), torch.randint(0, 4, (6,)))]
    exact, _ = activation_traces(model, ["a", "b", "fc"], batches)
    for draw in ("signs", "labels"):
        runs = [activation_traces(model, ["a", "b", "fc"], batches, estimator="sampled",
                                  draw=draw, min_draws=64, max_draws=64, seed=s)[0]
                for s in range(8)]
        for name in exact:
            for call, want in enumerate(exact[name]):
                got = torch.stack([r[name][call].mean() for r in runs])
                se = got.std() / len(runs) ** 0.5
                assert abs(got.mean() - want.mean()) <= 3 * se + 1e-6 * want.mean(), \
                    (draw, name, got, want)
    passes = []
    model.fc.register_full_backward_hook(lambda *a: passes.append(1))

    def draws(rel_tol):
        passes.clear()
        activation_traces(model, ["a"], batches, estimator="sampled", rel_tol=rel_tol,
                          min_draws=2, max_draws=500)
        return len(passes)
    assert draws(0.99) == 2 and 2 < draws(0.02) <= 500
