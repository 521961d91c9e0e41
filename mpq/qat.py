"""The QAT stage: fine-tune a fake-quantized student from its FP32 teacher by distillation
(`mpq.distill`: logits, and each quantized layer's output where `qat.feature_weight` > 0)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path

import torch
from torch import nn

from . import distributed
from .checkpoint import (check_payload, fp32_payload, load_checkpoint, load_state_dict_checked,
                         load_teacher, model_meta, save_checkpoint)
from .config import Recipe, TrainConfig, recipe_to_dict
from .data import make_loader
from .distill import distillation_loss, distillation_step_loss
from .errors import UsageError
from .files import file_sha256
from .report import log_qat_layout
from .quant import (INT8_WEIGHT_MAX, Plan, QuantConfig, calibrate_, freeze_bn_, gptq_init_,
                    prepare_qat, quant_layers, reestimate_bn_)
from .size import fp32_parameter_bytes, weight_bytes
from .trainer import (LAST, Batches, evaluate, fit, make_loaders, schedule_length,
                      write_metrics)

__all__ = ["QATConfig", "QATRecipe", "distillation_loss", "distillation_step_loss",
           "fine_tune_qat", "quantized_model", "train_qat"]


@dataclass
class QATConfig:
    """Quantization-aware training settings.

    `freeze_bn_epoch`: from this epoch (0-based) on, BN is folded into the weights for good and
    its statistics stay fixed; None (the default) folds only when training ends, the better
    parametrisation (docs/design_notes.md). Every epoch's test figure is taken in eval mode,
    which computes the folded, exported layer, so what is measured is what is exported.
    `weight_scale`: `mse`, `max` or `lsq` (see `mpq.quant.WeightQuantizer`).
    `freeze_ratio_epoch`: from this epoch (0-based) on, each `mse` weight quantizer keeps its
    clipping ratio (`WeightQuantizer.hold_ratio`): a refresh moves the grid under weights that
    had settled on it, which late in a schedule they undo less (uniform ternary, held through
    the last 3 of 10 epochs: 0.54 points better, README "Results"); None (the default):
    refreshed to the end. Under `progressive_bits` k it must be > k, so the plan's grid gets
    its own ratio first (at epoch k's first refresh: epochs of 100 steps or more). `max` and
    `lsq` scales have no ratio: the hold changes nothing there.
    `freeze_ratio_at`: the same hold from a fraction of the schedule on (epoch
    round(at * epochs)), so one recipe holds its last 30% under any `train.epochs`; set one of
    the two at most.
    `weight_ste`: `clip` (the default: weights beyond the clipping range get no gradient) or
    `identity` (every weight gets the straight-through gradient, as in TWN and TTQ).
    `bn_reestimate_batches`: after the last epoch, live BN statistics are recomputed as the
    exact average over this many augmented training batches (`mpq.quant.reestimate_bn_`);
    0 (the default) keeps the running averages of training.
    `feature_weight`: weight of the feature term of the loss (`mpq.distill`: each quantized
    layer's output against the teacher's at the same point); 0 (the default) distils logits
    only.
    `progressive_bits`: k > 0 trains each layer k bits above its plan in the first epoch (at
    most 8), one bit fewer each epoch after, so from epoch k on every layer trains, and is
    exported, at its own width (Zhuang et al. 2018's progressive quantization); 0: the plan's
    bits from the start.
    `freeze_oscillations`: > 0 freezes a weight once the moving average of how often its
    integer flips back exceeds this (Nagel et al. 2022's iterative freezing; see
    `mpq.quant.WeightQuantizer`); 0 (the default): no weight is frozen.
    `weight_init`: `nearest` (the default: QAT starts from the teacher's weights, each rounded
    alone) or `gptq` (they start on the integers of a post-training solution that cancels each
    layer's output error on the calibration images: `mpq.quant.gptq`).
    """

    alpha: float = 0.9
    temperature: float = 4.0
    freeze_bn_epoch: int | None = None
    freeze_ratio_epoch: int | None = None
    freeze_ratio_at: float | None = None
    calibration_batches: int = 8
    weight_scale: str = "mse"
    learn_act_scale: bool = False
    act_bits: int = 8
    quantize_joins: bool = True
    bn_reestimate_batches: int = 0
    feature_weight: float = 0.0
    progressive_bits: int = 0
    weight_ste: str = "clip"
    freeze_oscillations: float = 0.0
    weight_init: str = "nearest"

    def quant_config(self) -> QuantConfig:
        """The settings `prepare_qat` takes."""
        return QuantConfig(weight_scale=self.weight_scale, learn_act_scale=self.learn_act_scale,
                           quantize_joins=self.quantize_joins, weight_ste=self.weight_ste,
                           freeze_oscillations=self.freeze_oscillations)

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"qat.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UsageError(f"qat.temperature must be positive, got {self.temperature}")
        if self.weight_scale not in ("mse", "max", "lsq"):
            raise UsageError(f"qat.weight_scale must be mse, max or lsq; got {self.weight_scale!r}")
        if self.weight_ste not in ("clip", "identity"):
            raise UsageError(f"qat.weight_ste must be clip or identity; got {self.weight_ste!r}")
        if self.weight_ste == "identity" and self.weight_scale == "lsq":
            raise UsageError("qat.weight_ste identity needs qat.weight_scale mse or max: a "
                             "learned (lsq) scale takes LSQ's gradient, which clips")
        if not 2 <= self.act_bits <= 8:
            raise UsageError(f"qat.act_bits must be in 2..8, got {self.act_bits}")
        if self.calibration_batches < 1:
            raise UsageError("qat.calibration_batches must be >= 1")
        if not 0 <= self.progressive_bits <= 6:
            raise UsageError(f"qat.progressive_bits must be in 0..6 (0: the plan's bits from "
                             f"the start), got {self.progressive_bits}")
        if self.progressive_bits and self.weight_scale == "lsq":
            raise UsageError("qat.progressive_bits moves weights between grids, which a learned "
                             "(lsq) scale cannot follow: use qat.weight_scale mse or max")
        if not 0 <= self.freeze_oscillations < 1:
            raise UsageError(f"qat.freeze_oscillations is an oscillation frequency in [0, 1) "
                             f"(0: off), got {self.freeze_oscillations}")
        if self.progressive_bits and self.freeze_oscillations:
            raise UsageError("qat.progressive_bits moves weights between grids, on which "
                             "frozen integers mean other values: use one or the other")
        if self.feature_weight < 0:
            raise UsageError(f"qat.feature_weight must be >= 0 (0: logits only), got "
                             f"{self.feature_weight}")
        if self.weight_init not in ("nearest", "gptq"):
            raise UsageError(f"qat.weight_init must be nearest or gptq; got "
                             f"{self.weight_init!r}")
        if self.weight_init == "gptq" and self.freeze_oscillations:
            raise UsageError("qat.weight_init gptq needs qat.freeze_oscillations 0: frozen "
                             "weights keep the integers they are tracked on")
        if self.freeze_ratio_epoch is not None and self.freeze_ratio_epoch < 0:
            raise UsageError(f"qat.freeze_ratio_epoch holds the clipping ratios of mse weight "
                             f"scales from that epoch on: an epoch >= 0 (null: never), got "
                             f"{self.freeze_ratio_epoch}")
        if (self.freeze_ratio_epoch is not None and self.progressive_bits
                and self.freeze_ratio_epoch <= self.progressive_bits):
            raise UsageError(f"qat.freeze_ratio_epoch ({self.freeze_ratio_epoch}) would hold a "
                             f"ratio searched for a wider grid: with qat.progressive_bits "
                             f"{self.progressive_bits} it must be > {self.progressive_bits}")
        if self.freeze_ratio_at is not None:
            if self.freeze_ratio_epoch is not None:
                raise UsageError("qat.freeze_ratio_epoch and qat.freeze_ratio_at say the same "
                                 "thing two ways: set one of them (the other null)")
            if not 0 <= self.freeze_ratio_at <= 1:
                raise UsageError(f"qat.freeze_ratio_at holds the clipping ratios of mse weight "
                                 f"scales from that fraction of the schedule on: a fraction in "
                                 f"[0, 1] (null: never), got {self.freeze_ratio_at}")
        if self.bn_reestimate_batches < 0:
            raise UsageError("qat.bn_reestimate_batches must be >= 0 (0: keep the statistics "
                             "of training)")


@dataclass
class QATRecipe(Recipe):
    """A recipe with a `qat` section; `train` then holds the fine-tuning schedule."""

    qat: QATConfig = field(default_factory=QATConfig)


def epoch_start(student: nn.Module, cfg: QATConfig, train: TrainConfig, steps_per_epoch: int):
    """What QAT does before each epoch (`fit`'s `on_epoch_start`): from `qat.freeze_bn_epoch`
    on, BN folded for good; from `qat.freeze_ratio_epoch` on, `mse` clipping ratios held;
    under `qat.progressive_bits`, each layer's weight grid for that epoch. Set from the epoch
    alone, so a resumed run trains on the grid it stopped on."""
    epochs = schedule_length(train, steps_per_epoch)[1]  # fewer under train.max_steps
    if cfg.progressive_bits >= epochs:
        raise UsageError(f"qat.progressive_bits ({cfg.progressive_bits}) leaves no epoch at the "
                         f"plan's bits in {epochs}: lower it or train longer")
    freeze_at = cfg.freeze_bn_epoch if cfg.freeze_bn_epoch is not None else train.epochs
    hold_at = (cfg.freeze_ratio_epoch if cfg.freeze_ratio_at is None
               else round(cfg.freeze_ratio_at * epochs))
    if hold_at is not None and cfg.progressive_bits and hold_at <= cfg.progressive_bits:
        raise UsageError(f"qat.freeze_ratio_at {cfg.freeze_ratio_at} holds the clipping ratios "
                         f"from epoch {hold_at} of {epochs}, which would keep a ratio searched "
                         f"for a wider grid under qat.progressive_bits {cfg.progressive_bits}: "
                         f"raise it or train longer")
    layers = [m for m in quant_layers(student).values() if m.w_bits is not None]

    def on_epoch_start(epoch: int) -> None:
        if cfg.progressive_bits:
            for layer in layers:
                layer.weight_quant.set_bits(
                    min(8, layer.w_bits + max(0, cfg.progressive_bits - epoch)))
        if hold_at is not None:
            for layer in layers:
                layer.weight_quant.hold_ratio(epoch >= hold_at)
        if epoch >= freeze_at:
            freeze_bn_(student)
    return on_epoch_start


def quantized_model(model: nn.Module, plan: Plan, cfg: QATConfig, *, input_size: int = 32,
                    example_inputs: tuple | None = None) -> nn.Module:
    """`prepare_qat` with the QAT settings, traced on `example_inputs` (default: a dummy input
    of `input_size`)."""
    example = example_inputs or (torch.zeros(2, 3, input_size, input_size),)
    return prepare_qat(model, plan, example_inputs=example, config=cfg.quant_config())


def start_quantized_(student: nn.Module, cfg: QATConfig, inputs: list, *,
                     progress: bool = False) -> None:
    """Where QAT starts from the teacher's weights: activation scales calibrated on `inputs`
    (a few batches of images), then, under `qat.weight_init: gptq`, every weight rounded by
    `mpq.quant.gptq` on the same inputs."""
    calibrate_(student, inputs)
    if cfg.weight_init == "gptq":
        gptq_init_(student, inputs, progress=progress)


def train_qat(recipe: QATRecipe, *, plan: Plan, teacher: str | os.PathLike,
              out_dir: str | os.PathLike, data_root=None, device: str | torch.device = "auto",
              progress: bool = True, log: bool = True, ptq: bool = False,
              init: str | os.PathLike | None = None, keep_epochs: tuple[int, ...] = ()) -> dict:
    """The QAT stage: fine-tunes `plan` applied to the teacher; returns and writes metrics.

    With `ptq`, no training: calibrate, fold BN, evaluate and save (post-training quantization,
    the baseline QAT has to beat), in the same checkpoint format.

    With `init` (a QAT checkpoint of the same plan and quantizer settings, e.g. a finished
    run's model.pt), the student starts from its weights, quantizer scales and BN statistics
    instead of the teacher's calibrated weights, and trains the recipe's schedule afresh: a warm
    restart that adds epochs to a finished run (`warm_start_`). The teacher still teaches.

    Writes `out_dir/model.pt` (the QAT checkpoint, carrying its plan), `checkpoint_last.pt`,
    `plan.json`, `metrics.json` and `tb/` (each loss term, accuracy, learning rate and the
    per-layer weight quantization error).
    """
    from .device import resolve_device

    if plan.model != recipe.model.name:
        raise UsageError(f"the plan is for {plan.model!r} but the recipe trains "
                         f"{recipe.model.name!r}")
    device = distributed.init_from_env(resolve_device(device))
    payload = fp32_payload(teacher, model_name=recipe.model.name,
                           num_classes=recipe.model.num_classes)
    fp32 = load_teacher(teacher, model_name=recipe.model.name,
                        num_classes=recipe.model.num_classes,
                        normalization={"mean": list(recipe.data.mean),
                                       "std": list(recipe.data.std)}, payload=payload)
    cfg = recipe.qat
    student = quantized_model(fp32, plan, cfg, input_size=recipe.data.image_size)
    progress = progress and distributed.is_main()
    if log and distributed.is_main() and recipe.train.ema_epochs and not cfg.bn_reestimate_batches:
        print("note: train.ema_epochs averages BN's statistics too, which are not those of the "
              "averaged weights; set qat.bn_reestimate_batches (e.g. 200) to recompute them "
              "(benchmarks/average_bn.py: ternary's average 85.89% as trained, 87.90% so)")
    train_loader, test_loader = make_loaders(recipe, data_root=data_root, device=device,
                                             progress=progress, classes=payload.get("classes"))
    teacher_model = fp32.to(device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.preserve_format
    teacher_model = teacher_model.to(memory_format=memory_format)
    student = student.to(device).to(memory_format=memory_format)

    started_from = None
    if init is not None:
        started_from = warm_start_(student, init, plan=plan, cfg=cfg,
                                   model_name=recipe.model.name, out_dir=out_dir)
    else:  # calibrate on un-augmented training images, in their fixed order
        calib = make_loader(train_loader.split, recipe.data, batch_size=recipe.train.batch_size,
                            train=False, device=device,
                            channels_last=recipe.train.channels_last)
        start_quantized_(student, cfg, [x for _, (x, _) in zip(range(cfg.calibration_batches),
                                                               calib.epoch(0))],
                         progress=progress)

    on_epoch_start = epoch_start(student, cfg, recipe.train, len(train_loader))

    def epoch_logger(writer, model, epoch):
        layers = {n: m for n, m in quant_layers(model).items() if m.w_bits is not None}
        if cfg.freeze_oscillations:
            writer.add_scalar("frozen/all", frozen_fraction(model), epoch)
        if epoch == 1:  # the teacher's line from step 0: a one-epoch run still draws one
            log_qat_layout(writer, list(layers))
            writer.add_scalar("teacher/top1", teacher_top1, 0)
        writer.add_scalar("teacher/top1", teacher_top1, epoch)
        for name, layer in layers.items():
            # Under no_grad the read is no training step: the quantizers' refreshes stay put.
            with torch.no_grad():  # the weights QAT trains and the grid they are stored on
                w = layer.effective_weight()
                q = layer.quant_weight(w)
            writer.add_scalar(f"quant_error/{name}", layer.weight_error(w, q), epoch)
            if cfg.freeze_oscillations:
                writer.add_scalar(f"frozen/{name}", layer.weight_quant.frozen_fraction(), epoch)
            writer.add_histogram(f"weights_fp32/{name}", w, epoch)
            writer.add_histogram(f"weights_quantized/{name}", q, epoch)

    def on_train_end(model, final: dict) -> dict:
        if not cfg.bn_reestimate_batches:
            return {}
        batches = islice(train_loader.epoch(recipe.train.epochs), cfg.bn_reestimate_batches)
        if not reestimate_bn_(model, batches):
            return {}
        result = evaluate(model, test_loader)
        return {"top1": result["top1"], "test_loss": result["loss"],
                "top1_before_bn_reestimate": final["top1"],
                "bn_reestimate_batches": cfg.bn_reestimate_batches}

    teacher_top1 = evaluate(teacher_model, test_loader)["top1"]
    meta = {**model_meta(recipe), "kind": "qat", "classes": train_loader.split.classes,
            "plan": plan.to_dict(),
            "qat": _qat_meta(cfg), "init": started_from}
    if ptq:
        freeze_bn_(student)
        result = evaluate(student, test_loader)
        metrics = {"top1": result["top1"], "test_loss": result["loss"], "epochs": 0,
                   "train_seconds": 0.0}
        if distributed.is_main():
            save_checkpoint(Path(out_dir) / "model.pt", {
                **meta, "state_dict": student.state_dict(), "epoch": -1, "metrics": metrics,
                "recipe": recipe_to_dict(recipe)})
    else:
        metrics = fit(student, recipe=recipe, train_loader=train_loader,
                      test_loader=test_loader, out_dir=out_dir, meta=meta,
                      meta_match=_SAME_RUN,
                      loss_fn=distillation_step_loss(teacher_model, cfg, student),
                      progress=progress, log=log, on_epoch_start=on_epoch_start,
                      epoch_logger=epoch_logger, on_train_end=on_train_end,
                      keep_epochs=keep_epochs)
    if cfg.freeze_oscillations:
        metrics["frozen_fraction"] = frozen_fraction(student)
    if started_from:
        metrics["init"] = started_from
    metrics.update(teacher_top1=teacher_top1,
                   weight_bytes=weight_bytes(student, model_meta(recipe)),
                   fp32_bytes=fp32_parameter_bytes(fp32))
    metrics["compression"] = metrics["fp32_bytes"] / metrics["weight_bytes"]
    if distributed.is_main():
        plan.save(os.path.join(out_dir, "plan.json"))
        write_metrics(out_dir, metrics)
    return metrics


def _qat_meta(cfg: QATConfig) -> dict:
    # The quantizer settings a QAT checkpoint records (compared on resume and on a warm start).
    return {**cfg.quant_config().to_dict(), "int8_weight_max": INT8_WEIGHT_MAX}


def warm_start_(student: nn.Module, init: str | os.PathLike, *, plan: Plan, cfg: QATConfig,
                model_name: str, out_dir: str | os.PathLike) -> dict:
    """Loads the QAT checkpoint `init` (weights, quantizer scales, BN statistics) into
    `student`, which must be of the same model, plan and quantizer settings; returns what the
    run records of it: its sha256, its QAT epochs (counting its own warm start's) and top-1.

    The file is needed only to start: a run in `out_dir` that began from it resumes without
    it (a run parked on one machine and resumed on another), and one that began from another
    file is refused by `fit` (the recorded sha256 differs)."""
    path = Path(init)
    if not path.is_file():
        last = Path(out_dir) / LAST
        recorded = load_checkpoint(last).get("init") if last.is_file() else None
        if recorded:
            return recorded
        raise UsageError(f"--init {path} does not exist: pass a QAT run's model.pt (e.g. "
                         f"runs/qat/model.pt)")
    payload = load_checkpoint(path)
    source = f"--init {path}"
    if payload.get("kind") != "qat":
        raise UsageError(f"{source} is not a QAT checkpoint (kind {payload.get('kind')!r}): "
                         f"pass a QAT run's model.pt; the FP32 model goes to --teacher")
    check_payload(payload, source=source, require=("state_dict", "plan"))
    if payload["model"]["name"] != model_name:
        raise UsageError(f"{source} holds a {payload['model']['name']!r} model, but the recipe "
                         f"trains {model_name!r}")
    if not _same_plan(payload["plan"], plan.to_dict()):
        theirs = payload["plan"].get("layers", {})
        differ = sorted(k for k, v in plan.layers.items() if theirs.get(k) != v) or ["model"]
        raise UsageError(f"{source} was trained on another plan than this command's (differs "
                         f"at {', '.join(differ[:3])}): pass its run's plan.json as --plan")
    if not _same_qat(payload.get("qat", {}), _qat_meta(cfg)):
        now, theirs = _qat_meta(cfg), QuantConfig.from_dict(payload.get("qat", {})).to_dict()
        theirs["int8_weight_max"] = payload.get("qat", {}).get("int8_weight_max")
        differ = sorted(k for k in now if now[k] != theirs.get(k))
        raise UsageError(f"{source} was trained with other quantizer settings (differs in: "
                         f"{', '.join(differ)}): set them as it had them")
    load_state_dict_checked(student, payload["state_dict"], what=source)
    done = payload.get("metrics") or {}
    before = (payload.get("init") or {}).get("epochs", 0)
    return {"sha256": file_sha256(path), "epochs": int(done.get("epochs") or 0) + before,
            "top1": done.get("top1")}


def frozen_fraction(model: nn.Module) -> float:
    """The share of all quantized weights that `qat.freeze_oscillations` froze."""
    layers = [m for m in quant_layers(model).values() if m.w_bits is not None]
    frozen = sum(m.weight_quant.frozen_fraction() * m.layer.weight.numel() for m in layers)
    return frozen / max(1, sum(m.layer.weight.numel() for m in layers))


def _same_plan(recorded: dict, now: dict) -> bool:
    # What QAT trains: the model and each layer's bits. The search's scores are floats whose
    # last digits differ from one CPU to another, so a parked run resumes on any.
    return (recorded.get("model"), recorded.get("layers")) == (now.get("model"), now.get("layers"))


def _same_qat(recorded: dict, now: dict) -> bool:
    # A setting added to QuantConfig after the run began is absent from its checkpoint: the run
    # had the default then (QuantConfig.from_dict fills it in).
    rest = (set(recorded) | set(now)) - set(QuantConfig().to_dict())
    return (QuantConfig.from_dict(recorded) == QuantConfig.from_dict(now)
            and all(recorded.get(k) == now.get(k) for k in rest))


# How a QAT checkpoint's identity is compared on resume (`fit`'s meta_match).
_SAME_RUN = {"plan": _same_plan, "qat": _same_qat}


def fine_tune_qat(teacher: nn.Module, plan: Plan, batches, *, example_inputs: tuple,
                  epochs: int | None = None, lr: float | None = None,
                  cfg: QATConfig | None = None, train: TrainConfig | None = None,
                  calibration=None, device: str | torch.device = "cpu",
                  progress: bool = False) -> nn.Module:
    """QAT with distillation on any model and any data, in one call; returns the fake-quantized
    student in eval mode, BN folded (ready for `mpq.export.export_model`).

    The same training loop as the recipe-driven `train_qat` (`mpq.trainer.fit`: the same
    optimiser, per-step schedule, distillation step and BN handling; `train_qat` adds data
    loading, checkpoints and exact resume, evaluation, TensorBoard and DDP): the same batches
    give the same weights.

    Args:
        teacher: the FP32 model (its weights are not changed; it is put in eval mode on
            `device`, in the training memory format).
        plan: bits per layer (e.g. from `mpq.allocate.plan_for_budget`).
        batches: re-iterable (input, label) batches with a length, e.g. a DataLoader: one pass
            per epoch.
        example_inputs: inputs for tracing.
        epochs, lr: shorthands that override `train.epochs` and `train.lr`.
        cfg: distillation and quantizer settings (`QATConfig`).
        train: optimiser and schedule (`TrainConfig`); by default the QAT recipes' (one epoch,
            lr 0.01, SGD with Nesterov momentum 0.9, weight decay 1e-4, cosine per step).
        calibration: inputs calibrating the activation scales (default: the inputs of the
            first `cfg.calibration_batches` batches).
        device: where to train.
        progress: show a progress bar per epoch.
    """
    cfg = cfg or QATConfig()
    train = train or TrainConfig(epochs=1, lr=0.01, weight_decay=1e-4, schedule="cosine",
                                 warmup_epochs=0)
    train = replace(train, **{k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})
    device = torch.device(device)
    memory_format = torch.channels_last if train.channels_last else torch.preserve_format
    batches = Batches(batches, device, memory_format)
    student = quantized_model(teacher, plan, cfg, example_inputs=example_inputs)
    student = student.to(device).to(memory_format=memory_format)
    teacher = teacher.to(device).eval().to(memory_format=memory_format)
    start_quantized_(student, cfg,
                     [x for x, _ in islice(batches.epoch(0), cfg.calibration_batches)]
                     if calibration is None else [batches.move(x) for x in calibration])
    on_epoch_start = epoch_start(student, cfg, train, len(batches))
    fit(student, train_loader=batches, train_cfg=train,
        loss_fn=distillation_step_loss(teacher, cfg, student), progress=progress, log=False,
        on_epoch_start=on_epoch_start)
    freeze_bn_(student)
    return student.eval()
