import pytest

from mpq import timing


def _fake_clock(monkeypatch, burst_until_ms):
    """Runtimes of 1 and 3 ms a call on a clock that only they advance; each call costs 1.5x
    while outside load lasts (until `burst_until_ms`)."""
    now = [0.0]
    monkeypatch.setattr(timing.time, "perf_counter", lambda: now[0])

    def runtime(ms):
        def call(x):
            now[0] += (1.5 * ms if now[0] * 1000 < burst_until_ms else ms) / 1000
        return call
    return {"a": runtime(1.0), "b": runtime(3.0)}


def test_outside_load_over_some_rounds_moves_no_figure(monkeypatch):
    # 12 ms of warm-up, then 5 rounds of about 40 ms (20 ms of calls a runtime): the load
    # covers the first 3, which hold most of the samples (a pooled median read 1.5 and 4.5)
    runtimes = _fake_clock(monkeypatch, burst_until_ms=135)
    ms = timing.side_by_side(runtimes, None, seconds=0.1, rounds=5)
    assert ms == {"a": pytest.approx(1.0), "b": pytest.approx(3.0)}


def test_load_over_every_round_is_measured(monkeypatch):
    runtimes = _fake_clock(monkeypatch, burst_until_ms=10_000)
    ms = timing.side_by_side(runtimes, None, seconds=0.1, rounds=5)
    assert ms == {"a": pytest.approx(1.5), "b": pytest.approx(4.5)}
