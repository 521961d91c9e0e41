"""benchmarks/epoch_dips.py: where the last ratio refresh falls in each epoch, and the dips."""

import sys

import torch

from conftest import ROOT, run_script
from mpq.quant import WeightQuantizer

sys.path.insert(0, str(ROOT / "benchmarks"))
from epoch_dips import dips, steps_after_refresh  # noqa: E402


def _refreshes(quantizer, calls: int) -> list[int]:
    # The count of each of `calls` counted calls that refreshed the ratio.
    seen = []
    original = quantizer.refresh_ratio

    def spy(w):
        seen.append(int(quantizer.steps))
        original(w)
    quantizer.refresh_ratio = spy
    for _ in range(calls):
        quantizer(torch.randn(2, 16))
    return seen


def test_the_arithmetic_matches_where_a_quantizer_refreshes():
    per_epoch, every, epochs, old = 7, 5, 6, 2
    q = WeightQuantizer(3, 2, mode="mse", refresh_every=every)
    # An old-count epoch: 7 training steps, then the logging read, which counted (and could
    # refresh) like one.
    seen = _refreshes(q, (per_epoch + 1) * old + per_epoch * (epochs - old))
    want, start = [], 0
    for epoch in range(1, epochs + 1):  # training steps after each epoch's last refresh
        end = start + per_epoch + (epoch <= old)
        inside = [s for s in seen if start <= s < end]
        trained = range(start, start + per_epoch)
        want.append(None if not inside else sum(s > inside[-1] for s in trained))
        start = end
    assert steps_after_refresh(epochs, old, per_epoch, every) == want
    assert want == [1, 0, 2, 4, 1, 3]  # epoch 2's 0: its logging read refreshed


def test_a_dip_is_the_epoch_against_the_mean_of_its_neighbours():
    assert dips([80.0, 78.0, 82.0, 82.5]) == {2: -3.0, 3: 1.75}


def test_it_prints_the_dips_of_a_committed_curve():
    out = run_script("benchmarks/epoch_dips.py", "abl13_ep60_s1:all").stdout
    assert "epoch 55: refresh 3 steps before its end, top-1 87.28, dip -1.85" in out


def test_a_row_without_a_curve_is_a_usage_error():
    result = run_script("benchmarks/epoch_dips.py", "no_such_row")
    assert result.returncode == 2 and "no per-epoch curve" in result.stderr
