"""TensorBoard views: each figure renders headlessly at its intended size with something drawn,
and a real TensorBoard server over a run folder serves every view (images, scalars, hparams,
custom scalars)."""

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from mpq.hessian import LayerSensitivity
from mpq.report import (FIGURE_WIDTH, bits_figure, log_qat_layout, log_search, log_sensitivity,
                        pareto_points, perturbation_figure, sensitivity_figure, series_figure,
                        trials_figure)

NAMES = [f"layer{i}.conv{j}" for i in range(1, 4) for j in (1, 2)] + ["fc"]
SENS = {n: LayerSensitivity(10.0 ** (i - 3), 0.04 * 10.0 ** (i - 3), 10.0 ** (i - 4),
                            0.1 * 10.0 ** (i - 4), "exact" if i % 2 else "sampled", 8 * (i % 2),
                            100 * (i + 1))
        for i, n in enumerate(NAMES)}
OMEGA = {n: {b: 10.0 ** (i - b) for b in (2, 4, 8)} for i, n in enumerate(NAMES)}
BITS = {n: (2, 4, 8)[i % 3] for i, n in enumerate(NAMES)}
TRIALS = [{"number": k, "score": 1.0 / (k + 1), "size_bytes": 900 + 13 * k,
           "bits": {n: BITS[n] for n in NAMES}} for k in range(6)]


def test_pareto_points():
    points = [(10, 5.0), (12, 4.0), (11, 6.0), (15, 4.5), (20, 1.0)]
    assert pareto_points(points) == [(10, 5.0), (12, 4.0), (20, 1.0)]


def _pixels(fig) -> np.ndarray:
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3]


@pytest.mark.parametrize("make, width", [
    (lambda: sensitivity_figure(SENS), FIGURE_WIDTH),
    (lambda: sensitivity_figure(SENS, what="top_eigenvalue"), FIGURE_WIDTH),
    (lambda: perturbation_figure(OMEGA, BITS), FIGURE_WIDTH),
    (lambda: bits_figure(BITS, {n: 100 for n in NAMES}, {n: 60 for n in NAMES}), FIGURE_WIDTH),
    (lambda: bits_figure(BITS, {n: 100 for n in NAMES}, {n: 60 for n in NAMES},
                         {n: 4 if n != "layer1.conv1" else 8 for n in NAMES}), FIGURE_WIDTH),
    (lambda: trials_figure(TRIALS, budget_bytes=1000, chosen=TRIALS[-1]), FIGURE_WIDTH),
])
def test_each_figure_renders_at_its_width_with_something_drawn(make, width):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = make()
    FigureCanvasAgg(fig)
    pixels = _pixels(fig)
    assert pixels.shape[1] == width and pixels.shape[0] >= 240
    drawn = (pixels < 250).any(2).mean()  # not blank: ink on a fair share of the canvas
    assert 0.02 < drawn < 0.9, drawn
    # one row per layer: taller with more layers (what keeps names legible)
    if "layer1.conv1" in str([t.get_text() for t in fig.axes[0].get_yticklabels()]):
        assert pixels.shape[0] >= 15 * len(NAMES)


def test_a_series_point_is_labelled_unless_a_label_at_its_x_would_print_over_it():
    fig = series_figure({"curve": [(1, 1.58), (10, 0.50)],
                         "runs": [(10, 0.51), (10, 0.21), (60, 0.20)]},
                        title="t", xlabel="x", ylabel="y", logx=True, unjoined=("runs",))
    labels = sorted(t.get_text() for t in fig.axes[0].texts)
    assert labels == ["0.20", "0.21", "0.50", "1.58"]  # 0.51 at x=10 sits on 0.50: dropped


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def _post(url, body: dict):
    request = urllib.request.Request(url, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return r.read()


def test_tensorboard_serves_every_view_of_a_search_and_a_qat_run(tmp_path):
    writer = SummaryWriter(str(tmp_path / "tb"))
    log_sensitivity(writer, SENS)
    log_search(writer, {n: {"w_bits": BITS[n], "a_bits": 4 if n != "fc" else 8} for n in NAMES},
               TRIALS, omega=OMEGA,
               numel={n: 100 for n in NAMES}, nbytes={n: 60 for n in NAMES},
               budget_bytes=1000, chosen=TRIALS[-1])
    log_qat_layout(writer, NAMES)
    writer.close()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               str(tmp_path / "tb"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        tags = None
        while time.time() < deadline:
            try:
                tags = json.loads(_get(f"{base}/data/plugin/images/tags"))
                if tags.get(".", {}):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        plugins = json.loads(_get(f"{base}/data/plugins_listing"))
        for plugin in ("images", "scalars", "hparams", "custom_scalars"):
            assert plugins.get(plugin, {}).get("enabled"), (plugin, plugins)
        assert {"sensitivity/trace", "sensitivity/top_eigenvalue", "plan/w_bits",
                "plan/perturbation", "plan/size_vs_score"} <= set(tags["."]), tags
        query = urllib.parse.urlencode({"run": ".", "tag": "plan/perturbation"})
        entries = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
        png = _get(f"{base}/data/plugin/images/individualImage?{entries[0]['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        assert int.from_bytes(png[16:20], "big") == FIGURE_WIDTH  # the PNG's width
        query = urllib.parse.urlencode({"run": ".", "tag": "plan/w_bits/fc"})
        scalars = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert scalars[0][2] == BITS["fc"]  # (wall time, step, value)
        query = urllib.parse.urlencode({"run": ".", "tag": "plan/a_bits/layer1.conv1"})
        scalars = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert scalars[0][2] == 4
        experiment = json.loads(_post(f"{base}/experiment/defaultExperimentId/data/plugin/"
                                      f"hparams/experiment", {"experimentName": ""}))
        hparams = {h["name"] for h in experiment["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in experiment["metricInfos"]}
        assert {f"bits.{n}" for n in NAMES} <= hparams and \
            {"hparam/score", "hparam/size_bytes"} <= metrics, experiment
        layout = json.loads(_get(f"{base}/data/plugin/custom_scalars/layout"))
        charts = {c["title"] for cat in layout["category"] for c in cat["chart"]}
        assert "weight quantization error per layer" in charts
    finally:
        server.terminate()
        server.wait(timeout=10)
