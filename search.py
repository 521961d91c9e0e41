"""Choose per-layer bit widths for a memory budget: sensitivity, exact solver, Optuna search.

    python search.py --recipe recipes/resnet20_cifar10.yaml --budget 13x --out runs/search13x
    python search.py ... --budget 120KB        # bytes with a unit: B, KB, MB, KiB, MiB, ...
    python search.py ... --budget 13x --bops 32x   # and at most 1/32 of FP32's bit operations
    python search.py ... --budget 13x --latency-ms 0.5   # and 0.5 ms a batch in ONNX Runtime here
    python search.py ... --bops 32x              # any one budget alone, or several together

Writes plan.json (feed it to train.py --plan), sensitivity.json, search.json and TensorBoard
logs in tb/. The Optuna study lives in study.db in --out (or --storage URL) and resumes.
"""

import argparse

from mpq.cli import Parser, add_common_args, run_cli


def main() -> None:
    parser = Parser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe with a search section")
    parser.add_argument("--budget",
                        help="bytes with a unit (120KB, 0.1MiB) or a ratio to FP32 (13x); "
                        "without it the plan's only limit on bytes is the FP32 size")
    parser.add_argument("--bops", help="a budget of bit operations: a ratio to "
                        "FP32's (32x) or a figure (400M, 2.5e9)")
    parser.add_argument("--latency-ms", type=float,
                        help="a latency budget: milliseconds per batch of "
                        "search.latency_batch images (1) in search.latency_runtime (onnxruntime) "
                        "on this CPU, against a per-layer table mpq measures and caches")
    parser.add_argument("--out", required=True, help="run folder")
    parser.add_argument("--checkpoint", help="FP32 model: an mpq checkpoint, a state dict file or "
                        "torchvision:<Weights> (default: the recipe's)")
    parser.add_argument("--storage", help="Optuna RDB URL (default: SQLite in --out)")
    parser.add_argument("--trials", type=int, help="trials in all (default: the recipe's)")
    parser.add_argument("--timeout", type=float, help="seconds for the study")
    add_common_args(parser)
    args = parser.parse_args()
    run_cli(lambda: run(args), interrupted="completed trials stay in the study; run the same "
                                           "command to resume")


def run(args) -> None:
    from mpq.cli import check_out_dir
    from mpq.config import load_recipe
    from mpq.search import SearchRecipe, run_search

    check_out_dir(args.out)
    if args.budget is None and args.bops is None and args.latency_ms is None:
        from mpq.errors import UsageError

        raise UsageError("give at least one budget: --budget (bytes on disk, e.g. 13x or "
                         "120KB), --bops (e.g. 32x) or --latency-ms (e.g. 0.5)")
    overrides = list(args.overrides)
    if args.trials is not None:
        overrides.append(f"search.trials={args.trials}")
    if args.timeout is not None:
        overrides.append(f"search.timeout={args.timeout}")
    recipe = load_recipe(args.recipe, overrides, cls=SearchRecipe)
    plan = run_search(recipe, budget=args.budget, out_dir=args.out, data_root=args.data_root,
                      checkpoint=args.checkpoint, storage=args.storage, device=args.device,
                      progress=not args.quiet, bops=args.bops, latency_ms=args.latency_ms)
    e = plan.extra
    bops = (f" bops={e['bops']:.4g} ({e['fp32_bops'] / e['bops']:.2f}x fewer than FP32)"
            if "bops" in e else "")
    latency = (f" latency_ms={e['latency_ms']:.3f} (measured {e['latency_measured_ms']:.3f}, "
               f"budget {e['latency_budget_ms']:g})" if "latency_ms" in e else "")
    print(f"size_bytes={e['size_bytes']} budget_bytes={e['budget_bytes']} "
          f"compression={e['compression']:.2f}x{bops}{latency} "
          f"score={e.get('score', float('nan')):.5f}")
    print(f"plan={args.out}/plan.json")


if __name__ == "__main__":
    main()
