"""Screenshots of TensorBoard's tabs over a run folder, taken with headless Chromium: what a
person sees at the default zoom in a browser window of the given size.

    python tools/tb_screenshots.py --logdir runs/search_13x/tb --out docs/screenshots \
        [--tabs images,images:sensitivity,hparams] [--size 1400x1800]

Starts TensorBoard on 127.0.0.1 at a free port, waits until it serves the run, and writes
<out>/<name>_<tab>.png per tab (name: --name, default the logdir's parent folder's name); a tab
written `tab:regex` is shown with its tag filter set to regex (`images:sensitivity`: only the
sensitivity figures, for a window too short to hold them all).
Chromium comes from Debian (`apt-get install chromium`); nothing is downloaded.
"""

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

# Chromium's background services try the network at start; this machine's network is closed.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serving(base: str, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/runs", timeout=5) as r:
                if json.loads(r.read()):
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--logdir", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--tabs", default="images,images:sensitivity,hparams")
    parser.add_argument("--size", default="1400x1800")
    parser.add_argument("--name", default=None)
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--wait", type=float, default=20.0,
                        help="seconds of page time Chromium gives TensorBoard to render")
    args = parser.parse_args()
    if not args.logdir.is_dir():
        sys.exit(f"error: {args.logdir} is not a folder of TensorBoard event files")
    if not Path(args.chromium).is_file():
        sys.exit(f"error: no Chromium at {args.chromium}; apt-get install chromium, or pass "
                 f"--chromium")
    width, height = (int(v) for v in args.size.lower().split("x"))
    name = args.name or args.logdir.resolve().parent.name
    args.out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir",
                               str(args.logdir), "--host", "127.0.0.1", "--port", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        if not _serving(base, 90):
            sys.exit(f"error: TensorBoard did not serve {args.logdir} within 90 s")
        for spec in args.tabs.split(","):
            tab, _, pattern = spec.partition(":")
            target = args.out / f"{name}_{tab}{'_' + pattern if pattern else ''}.png"
            url = f"{base}/#{tab}" + (f"&tagFilter={urllib.parse.quote(pattern)}" if pattern
                                      else "")
            with tempfile.TemporaryDirectory() as profile:
                subprocess.run([args.chromium, *FLAGS, f"--user-data-dir={profile}",
                                f"--window-size={width},{height}",
                                f"--virtual-time-budget={int(args.wait * 1000)}",
                                f"--screenshot={target}", url],
                               check=True, capture_output=True, timeout=180)
            print(f"wrote {target}")
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
