import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# One thread per test process: tiny models gain nothing from more, and results stay identical
# however many cores the machine has.
torch.set_num_threads(1)

TINY_RECIPE = {
    "version": 1,
    "model": {"name": "resnet20", "num_classes": 4},
    "data": {"dataset": "synthetic", "image_size": 12, "synthetic_train_size": 384,
             "synthetic_test_size": 64, "crop_padding": 2, "cutout": 4},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "warmup_epochs": 0.5,
              "eval_batch_size": 64, "channels_last": False},
}


@pytest.fixture
def tiny_recipe_dict():
    """A recipe that trains ResNet20 on 192 synthetic 12x12 images in a few seconds."""
    return yaml.safe_load(yaml.safe_dump(TINY_RECIPE))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """An FP32 checkpoint of TINY_RECIPE, trained once per test session."""
    from mpq.config import recipe_from_dict
    from mpq.trainer import train_fp32

    out = tmp_path_factory.mktemp("teacher")
    recipe = recipe_from_dict(yaml.safe_load(yaml.safe_dump(TINY_RECIPE)))
    train_fp32(recipe, out_dir=out, device="cpu", progress=False, log=False)
    return out / "model.pt"


@pytest.fixture
def write_recipe(tmp_path):
    def write(data, name="recipe.yaml"):
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path
    return write


@pytest.fixture
def tiny_search(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    """`tiny_search(**settings)`: a function of (out, *args) giving search.py's command line on
    the tiny teacher, with a short search (4 trials, 2 and 4 and 8-bit weights) and `settings`
    added to the recipe's search section."""
    def make(**settings):
        recipe = {k: v for k, v in tiny_recipe_dict.items() if k != "train"}
        recipe["search"] = {"checkpoint": str(tiny_teacher), "trials": 4,
                            "holdout_images": 64, "batch_size": 32, "sensitivity_batches": 1,
                            "calibration_batches": 1, "bit_choices": [2, 4, 8], **settings}
        path = write_recipe(recipe)
        return lambda out, *extra: ["search.py", "--recipe", path, "--out", tmp_path / out,
                                    "--device", "cpu", "--quiet", *extra]
    return make


@pytest.fixture(autouse=True)
def _default_sigchld():
    # A DataLoader with workers installs a process-wide SIGCHLD handler in the test process
    # (torch.utils.data._utils.signal_handling); left behind, it runs when a later test
    # SIGKILLs its own child. Under xdist a test doing that after the stream tests took the
    # worker down ("node down: Not properly terminated") three runs in three: each test starts
    # with the default handler.
    yield
    import signal

    from torch.utils.data._utils import signal_handling

    if signal_handling._SIGCHLD_handler_set:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal_handling._SIGCHLD_handler_set = False


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Decoded-image caches of test data go to the test's own folder, never the user's cache.
    monkeypatch.setenv("MPQ_CACHE", str(tmp_path / "cache"))


def run_script(*args, env=None, timeout=300):
    """Runs a repository script or module in a fresh interpreter; returns the CompletedProcess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def _wait_for(predicate, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def _has_partial(path: Path) -> bool:
    from mpq.checkpoint import load_checkpoint
    from mpq.errors import UsageError

    try:
        return path.is_file() and "partial" in load_checkpoint(path)
    except UsageError:  # caught between its write and its rename: not there yet
        return False


def kill_mid_epoch_and_resume(args, tmp_path, *, from_partial=False, timeout=300):
    """Runs `args` (a train.py command without --out) straight, and again killed with SIGKILL
    half-way through its second epoch (or, with `from_partial`, right after its first
    mid-epoch checkpoint) and then resumed; asserts both end with equal weights. Returns the
    resumed run's stdout."""
    from mpq.checkpoint import load_checkpoint

    cmd = [sys.executable, *map(str, args), "--device", "cpu", "--quiet", "--out"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    subprocess.run([*cmd, str(tmp_path / "straight")], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=timeout)
    killed_dir = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, str(killed_dir)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = killed_dir / "checkpoint_last.pt"
    if from_partial:
        assert _wait_for(lambda: _has_partial(last), timeout), "no mid-epoch checkpoint appeared"
    else:
        assert _wait_for(last.is_file, 120), "the first epoch's checkpoint never appeared"
        # Kill half-way through epoch 2: the first epoch's own duration says when that is.
        time.sleep(load_checkpoint(last)["history"][0]["seconds"] / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed_dir / "model.pt").exists(), "the run finished before it was killed"
    resumed = subprocess.run([*cmd, str(killed_dir)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=timeout)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout
    a = load_checkpoint(tmp_path / "straight" / "model.pt")["state_dict"]
    b = load_checkpoint(killed_dir / "model.pt")["state_dict"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return resumed.stdout


def net_with_data(net: torch.nn.Module, *, images: int, classes: int, size: int):
    """`net` with BN statistics from one pass over random images (seed 0), in eval mode, and
    those images with random labels."""
    torch.manual_seed(0)
    x = torch.randn(images, 3, size, size)
    y = torch.randint(0, classes, (images,))
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval(), x, y
