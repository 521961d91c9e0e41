"""Train a model: FP32 from scratch (a teacher), or QAT with distillation from a teacher.

    python train.py --recipe recipes/resnet20_cifar10_fp32.yaml --out runs/teacher
    python train.py --recipe recipes/resnet20_cifar10_qat.yaml --teacher checkpoints/resnet20_cifar10.pt \\
        --plan runs/search/plan.json --out runs/qat        # or --bits 4 for a uniform plan

    python train.py --recipe recipes/resnet20_cifar10_qat.yaml --teacher checkpoints/resnet20_cifar10.pt \\
        --plan runs/search/plan.json --init runs/qat/model.pt --out runs/qat_more
                                   # a warm restart: the recipe's epochs again, from a finished run

QAT ends with an export into OUT/export/ (model.mpq, model_int8.onnx, model_int8.pt, export.json;
see `python -m mpq export`), kept on a rerun unless model.pt changed. An existing run in --out
resumes exactly; a run of another recipe, model or plan there is refused.
Under torchrun, QAT and FP32 training use DistributedDataParallel.
"""

import argparse

from mpq.cli import Parser, add_common_args, run_cli


def main() -> None:
    parser = Parser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", required=True, help="YAML recipe (see recipes/)")
    parser.add_argument("--out", required=True, help="run folder; an existing run there resumes")
    parser.add_argument("--teacher", help="FP32 model to quantize and distil from (QAT): an mpq "
                        "checkpoint, a state dict file, or torchvision:<Weights>")
    plan = parser.add_mutually_exclusive_group()
    plan.add_argument("--plan", help="bit plan JSON (from search.py)")
    plan.add_argument("--bits", type=int, help="uniform plan: every layer's weights at N bits")
    parser.add_argument("--ptq", action="store_true",
                        help="post-training quantization: calibrate only, no training")
    parser.add_argument("--init", metavar="MODEL_PT",
                        help="start QAT from this QAT checkpoint (a finished run's model.pt, "
                             "of the same plan and qat settings) instead of the teacher, and "
                             "train the recipe's schedule afresh: a warm restart")
    parser.add_argument("--keep-epoch", type=int, action="append", default=[], metavar="N",
                        help="also keep the checkpoint after epoch N (from 1) as "
                             "OUT/checkpoint_epochN.pt, to fork the run there; repeatable")
    parser.add_argument("--no-export", action="store_true",
                        help="skip the export after QAT (into OUT/export/)")
    add_common_args(parser)
    args = parser.parse_args()
    run_cli(lambda: run(args))


def run(args) -> None:
    from mpq.cli import check_out_dir
    from mpq.config import load_recipe
    from mpq.errors import UsageError

    check_out_dir(args.out)
    if args.teacher is None:
        if args.plan or args.bits is not None or args.ptq or args.init:
            raise UsageError("QAT needs --teacher: the FP32 checkpoint to quantize")
        from mpq.trainer import train_fp32

        recipe = load_recipe(args.recipe, args.overrides)
        metrics = train_fp32(recipe, out_dir=args.out, data_root=args.data_root,
                             device=args.device, progress=not args.quiet,
                             keep_epochs=tuple(args.keep_epoch))
    else:
        from mpq.distributed import is_main
        from mpq.checkpoint import load_teacher
        from mpq.qat import QATRecipe, train_qat
        from mpq.quant import load_plan, quantizable_layers, uniform_plan

        recipe = load_recipe(args.recipe, args.overrides, cls=QATRecipe)
        if args.plan:
            plan = load_plan(args.plan)
        elif args.bits is not None:
            teacher = load_teacher(args.teacher, model_name=recipe.model.name,
                                   num_classes=recipe.model.num_classes)
            plan = uniform_plan(recipe.model.name, quantizable_layers(teacher),
                                w_bits=args.bits, a_bits=recipe.qat.act_bits)
        else:
            raise UsageError("QAT needs a plan: --plan PLAN.json (from search.py) or --bits N")
        if args.init and args.ptq:
            raise UsageError("--init starts training from a QAT checkpoint; --ptq trains none: "
                             "use one or the other")
        metrics = train_qat(recipe, plan=plan, teacher=args.teacher, out_dir=args.out,
                            data_root=args.data_root, device=args.device,
                            progress=not args.quiet, ptq=args.ptq, init=args.init,
                            keep_epochs=tuple(args.keep_epoch))
        print(f"teacher_top1={metrics['teacher_top1']:.2f} weight_bytes={metrics['weight_bytes']} "
              f"compression={metrics['compression']:.2f}x")
        if not args.no_export and is_main():
            export(args, model_name=recipe.model.name)
    print(f"top1={metrics['top1']:.2f}")


def export(args, *, model_name: str) -> None:
    """Exports the finished QAT run into OUT/export/ (kept if it already exports this model.pt);
    the recipe names its model (`model_name`), so a factory there is built."""
    from pathlib import Path

    from mpq.cli import print_export
    from mpq.export.run import export_checkpoint, export_is_current

    out = Path(args.out) / "export"
    checkpoint = Path(args.out) / "model.pt"
    if export_is_current(checkpoint, out):
        print(f"{out} already holds this run's export; kept (python -m mpq export --force "
              f"redoes it)")
        return
    force = (out / "export.json").exists()  # an export of an earlier model.pt
    if force:
        print(f"{checkpoint} changed since {out} was exported; exporting it again")
    print_export(export_checkpoint(checkpoint, out, data_root=args.data_root, force=force,
                                   progress=not args.quiet, expect_model=model_name), out)


if __name__ == "__main__":
    main()
