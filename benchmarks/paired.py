"""Are two results rows different, or only two draws? Their models compared image by image.

    python benchmarks/paired.py ROW ROW [ROW ...] --data-root ROOT [--threads 1]

Each ROW's committed `model.mpq` (checkpoints/resnet20_cifar10/ROW/, the file `results.py
--publish` copies) is rebuilt exactly (`mpq.export.load_mpq`) and run on the test split. For
each pair it prints both top-1s, the images right in one and wrong in the other (b and c), the
standard deviation that a difference in top-1 has from the test set alone, sqrt(b + c) / N,
and McNemar's exact two-sided p-value: how often two equally good models would differ by as
much. Top-1 here is the fake-quantized model's (`fake_quant_top1` in the rows' JSON), within a
few hundredths of the ONNX Runtime figure the table reports.
"""

import argparse
import itertools
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARTIFACTS = ROOT / "checkpoints" / "resnet20_cifar10"


def mcnemar_p(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: the chance, under a fair coin for each of the b + c
    images the two models disagree on correctness, of a split at least as uneven."""
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(b, c) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def compare(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> dict:
    """Paired figures of two models' predictions `a` and `b` on the same labelled images."""
    right_a, right_b = a == labels, b == labels
    only_a, only_b = int((right_a & ~right_b).sum()), int((right_b & ~right_a).sum())
    n = len(labels)
    return {"top1_a": 100.0 * float(right_a.float().mean()),
            "top1_b": 100.0 * float(right_b.float().mean()),
            "only_a": only_a, "only_b": only_b,
            "disagree": 100.0 * float((a != b).float().mean()),
            "sd_points": 100.0 * math.sqrt(only_a + only_b) / n,
            "p": mcnemar_p(only_a, only_b)}


def model_file(row: str) -> Path:
    from mpq.errors import UsageError

    path = ARTIFACTS / row / "model.mpq"
    if not path.is_file():
        raise UsageError(f"{path} does not exist: name a row whose artifacts are committed "
                         f"(ls {ARTIFACTS})")
    return path


def predictions(path: Path, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's predicted classes over the loader's one pass, and the labels."""
    from mpq.export import load_mpq

    model = load_mpq(path, expect_model="resnet20")[0].eval()
    preds, labels = [], []
    with torch.inference_mode():
        for x, y in loader.epoch(0):
            preds.append(model(x).argmax(1))
            labels.append(y)
    return torch.cat(preds), torch.cat(labels)


def main() -> None:
    from mpq.cli import Parser, positive_int, run_cli

    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", nargs="+", metavar="ROW")
    parser.add_argument("--data-root", required=True, help="CIFAR-10 in ImageFolder layout")
    parser.add_argument("--threads", type=positive_int, default=1)
    args = parser.parse_args()
    if len(args.rows) < 2:
        parser.error("name at least two rows to compare")
    run_cli(lambda: _run(args), interrupted="nothing was written")


def _run(args) -> None:
    from mpq.config import load_recipe
    from mpq.data import load_split, make_loader
    from mpq.qat import QATRecipe

    files = {row: model_file(row) for row in args.rows}  # a wrong name fails before any work
    torch.set_num_threads(args.threads)
    data = load_recipe(ROOT / "recipes" / "resnet20_cifar10_qat.yaml", cls=QATRecipe).data
    test = load_split(data, "test", root=args.data_root, num_classes=10, progress=False)
    loader = make_loader(test, data, batch_size=500, train=False)
    preds = {}
    for row, path in files.items():  # the test loader is unshuffled: one order of labels
        preds[row], labels = predictions(path, loader)
    print(f"{len(labels)} test images; b, c: right only in the first, only in the second")
    for a, b in itertools.combinations(args.rows, 2):
        r = compare(preds[a], preds[b], labels)
        print(f"{a} {r['top1_a']:.2f} vs {b} {r['top1_b']:.2f}: disagree on {r['disagree']:.2f}%"
              f", b={r['only_a']} c={r['only_b']}, sd of the difference {r['sd_points']:.2f} "
              f"points, McNemar p={r['p']:.3f}")


if __name__ == "__main__":
    main()
