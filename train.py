"""Train a model: FP32 from scratch (a teacher), resumable.

    python train.py --recipe recipes/resnet20_cifar10_fp32.yaml --out runs/teacher
"""

import argparse

from mpq.cli import add_common_args, run_cli


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("--out", required=True, help="run folder; an existing run there resumes")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe value, e.g. train.epochs=3")
    add_common_args(parser)
    args = parser.parse_args()

    def body():
        from mpq.config import load_recipe
        from mpq.trainer import train_fp32

        recipe = load_recipe(args.recipe, args.overrides)
        metrics = train_fp32(recipe, out_dir=args.out, data_root=args.data_root,
                             device=args.device, progress=not args.quiet)
        print(f"top1={metrics['top1']:.2f}")

    run_cli(body)


if __name__ == "__main__":
    main()
