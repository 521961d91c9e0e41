"""ResNet20 / CIFAR-10 results: every row of the README's results table, from one command.

    python benchmarks/results.py [--data-root ROOT] [--rows fp32,mpq_13x,...] [--table-only]
                                 [--publish] [--park] [--park-every MINUTES] [--no-table]

Each row runs the commands a user would (recorded in its JSON), on the committed teacher
`checkpoints/resnet20_cifar10.pt`:

    fp32, fp16      the teacher, evaluated in float32 / with its weights in float16
    ao_int8_ptq     torch.ao FX static int8 PTQ (x86, conv+BN+ReLU fused), the seed's path
    ptq_w4, ptq_w2  uniform W4A8 / W2A8 post-training quantization (train.py --ptq), exported
    qat_w8          uniform W8A8 QAT, 2 epochs, exported
    qat_w4, qat_w2  uniform W4A8 / W2A8 QAT (the QAT recipe's 10 epochs), exported
    mpq_8x, mpq_13x, mpq_16x
                    search.py --budget, train.py --plan (QAT with distillation), exported;
                    13x gets 60 epochs (its target, <= 0.3 points lost, was missed at 10
                    and 30), 16x 30, 8x the recipe's 10. A budget below the smallest plan
                    (every layer at 2 bits) is recorded as infeasible, with that size.
    qat_w4a4        uniform W4A4 QAT (the image entering conv1 at 8 bits), float32
    make_run        `make run`'s two commands (13x search on the recipe's defaults, QAT
                    recipe), float32
    mpq_13x_bops64  search.py --budget 13x --bops 64x with activation bits chosen per layer
                    (search.a_bit_choices [4, 8]), QAT recipe, float32
    abl13_*         QAT ablations: the committed 13x plan (checkpoints/resnet20_cifar10/
                    mpq_13x/plan.json) fine-tuned by the QAT recipe, one change each
                    (results_table/layout.py ABLATIONS), precision pinned; abl13_ep1/2/5/20
                    are its points-lost-against-epochs curve (10: abl13_fp32).

A row whose `benchmarks/results/<row>.json` exists is not recomputed (delete it to redo one);
the searches and QAT runs under `runs/results/` resume where a killed run stopped. A row longer
than a session: `--park` (after stopping it) copies each unfinished row's last QAT checkpoint
into `benchmarks/results/inflight/<row>/` to commit, and the next run on any machine resumes
it from there; `--park-every MINUTES` parks the row being computed that often while it runs,
so a session stopped without warning still leaves a recent checkpoint to commit. An mpq row
that no longer stands for its commands (its model.mpq weighs other than its search planned, so
the file format changed since; or its search, run again, picks other bits) is named on the
console and marked stale in the table, not silently kept. Then every finished row's latency
is measured side by side (batch 1 and 256, 2 threads, each row's best runtime; on a fresh
clone, models whose run folders are gone are rebuilt from the teacher and the committed
`model.mpq` files first), and the script writes `benchmarks/results/latency.json`, the
accuracy-vs-size curve and points lost against QAT epochs (13x, 16x, ternary) to TensorBoard
(`runs/results/tb`), and prints the table. With `--publish` it also writes the table into the
README (between its `results:begin` / `results:end` markers), the epochs figure to
`docs/figures/points_lost_vs_epochs.png`, and each exported row's small artifacts to
`checkpoints/resnet20_cifar10/`. The logic is the package `results_table` beside this script; this is its command.
"""

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpq.errors import UsageError  # noqa: E402
from results_table import COMPUTE_ORDER, Layout, RowFailed, park, run  # noqa: E402
from results_table.compute import stop_commands_on_sigterm  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("MPQ_DATA"))
    parser.add_argument("--rows", default=",".join(COMPUTE_ORDER),
                        help="comma-separated rows to compute, in this order")
    parser.add_argument("--table-only", action="store_true",
                        help="skip computing rows; measure latency and print the table")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--teacher", type=Path, default=None,
                        help="FP32 teacher (default: the committed one)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="trial mode: rows, runs and TensorBoard go under this folder")
    parser.add_argument("--park", action="store_true",
                        help="copy each unfinished row's last QAT checkpoint into "
                             "benchmarks/results/inflight/ (to commit) and stop")
    parser.add_argument("--park-every", type=float, default=None, metavar="MINUTES",
                        help="while computing a row, park it this often (to commit)")
    parser.add_argument("--no-table", action="store_true",
                        help="stop once the rows are computed: no latency, no table (for rows "
                             "run side by side)")
    parser.add_argument("--publish", action="store_true",
                        help="write the table into README.md and the rows' files into "
                             "checkpoints/ (not with --scratch)")
    args = parser.parse_args()
    if args.park_every is not None and args.park_every <= 0:
        parser.error(f"--park-every must be a positive number of minutes, got {args.park_every}")
    if args.no_table and (args.publish or args.table_only):
        parser.error("--no-table computes rows only; it cannot make or publish the table")
    if args.publish and args.scratch is not None:
        parser.error("--publish writes the repository's README and checkpoints; a --scratch "
                     "run cannot")
    layout = Layout.of(ROOT, teacher=args.teacher, scratch=args.scratch)
    stop_commands_on_sigterm()
    if args.park:
        done = park(layout, args.rows.split(","))
        for name, epochs in done.items():
            print(f"parked {name} after {epochs} epochs in "
                  f"{layout.rel(layout.results / 'inflight' / name)}")
        if not done:
            print("no unfinished row with a QAT checkpoint to park")
        return
    try:
        table = run(layout, args.rows.split(","), data_root=args.data_root,
                    table_only=args.table_only, threads=args.threads, seconds=args.seconds,
                    publish=args.publish, park_every=args.park_every,
                    table=not args.no_table)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except RowFailed as exc:
        sys.exit(str(exc))
    if table:
        print(table)


if __name__ == "__main__":
    main()
