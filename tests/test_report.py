"""TensorBoard: a real server over a search's run folder serves the charts and the bits back."""

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
from mpq.report import bar_chart, log_search, log_sensitivity, pareto_points


def test_pareto_points():
    points = [(10, 5.0), (12, 4.0), (11, 6.0), (15, 4.5), (20, 1.0)]
    assert pareto_points(points) == [(10, 5.0), (12, 4.0), (20, 1.0)]


def test_bar_chart_draws_every_bar():
    img = bar_chart(["a", "b", "c"], [1.0, 2.0, 0.5], [0.1, 0.0, 0.2], title="t")
    assert img.ndim == 3 and img.dtype == np.uint8
    blue = (img == np.array([52, 101, 164], dtype=np.uint8)).all(2)
    rows_with_bar = np.flatnonzero(blue.any(1))
    assert len(rows_with_bar) > 0 and blue.sum(1).max() > blue.sum(1)[rows_with_bar].min()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url):
    with urllib.request.urlopen(url, timeout=10) as r:
        return r.read()


def test_tensorboard_serves_sensitivity_chart_and_bits(tmp_path):
    sens = {"conv1": LayerSensitivity(2.0, 0.1, 1.0, 0.0, "hutchinson", 40, 432),
            "fc": LayerSensitivity(5.0, 0.0, 3.0, 0.0, "exact", 0, 640)}
    writer = SummaryWriter(str(tmp_path / "tb"))
    log_sensitivity(writer, sens)
    log_search(writer, {"conv1": {"w_bits": 4}, "fc": {"w_bits": 8}},
               [{"number": 0, "score": 0.5, "size_bytes": 900},
                {"number": 1, "score": 0.4, "size_bytes": 950}])
    writer.close()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               str(tmp_path / "tb"), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        tags = None
        while time.time() < deadline:
            try:
                tags = json.loads(_get(f"{base}/data/plugin/images/tags"))
                if tags.get(".", {}):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        assert tags and "sensitivity/trace" in tags["."], tags
        query = urllib.parse.urlencode({"run": ".", "tag": "sensitivity/trace"})
        entries = json.loads(_get(f"{base}/data/plugin/images/images?{query}"))
        png = _get(f"{base}/data/plugin/images/individualImage?{entries[0]['query']}")
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        query = urllib.parse.urlencode({"run": ".", "tag": "plan/w_bits/conv1"})
        scalars = json.loads(_get(f"{base}/data/plugin/scalars/scalars?{query}"))
        assert scalars[0][2] == 4.0  # (wall time, step, value)
    finally:
        server.terminate()
        server.wait(timeout=10)
