"""The QAT stage: fine-tune a fake-quantized student from its FP32 teacher by distillation.

    loss = alpha * T^2 * KL(p_teacher || p_student) + (1 - alpha) * CE(student, labels)

with p = softmax(logits / T), KL averaged over the batch (`batchmean`, Hinton et al. 2015): in
torch's argument order, `kl_div(log p_student, log p_teacher)`. The teacher runs in eval mode
without gradients.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .checkpoint import fp32_payload, model_from_checkpoint, save_checkpoint
from .config import Recipe, recipe_to_dict
from .data import make_loader
from .errors import UsageError
from .precision import autocast_dtype
from .quant import (INT8_WEIGHT_MAX, Plan, calibrate_, freeze_bn_, prepare_qat, quant_layers,
                    reestimate_bn_)
from .quant.modules import full_range_int8_weights_
from .size import fp32_parameter_bytes, weight_bytes

__all__ = ["QATConfig", "QATRecipe", "distillation_loss", "load_teacher",
           "qat_model_from_checkpoint", "quantized_model", "train_qat"]


@dataclass
class QATConfig:
    """Quantization-aware training settings.

    `freeze_bn_epoch`: from this epoch (0-based) on, BN is folded into the weights for good and
    its statistics stay fixed; None (the default) folds only when training ends. Every epoch's
    test figure is taken in eval mode, which computes the folded, exported layer, so what is
    measured is what is exported either way. Folding for good mid-run is a worse
    parametrisation: a channel's relative step grows by (sigma / gamma)^2, and measured on
    ResNet20 W4A8 (10 epochs) it took test top-1 from 89.49 to 39.55 in the one epoch after
    folding, at a learning rate of 2.4e-4; with BN live to the end the run ends where it was.
    `weight_scale`: `mse`, `max` or `lsq` (see `mpq.quant.WeightQuantizer`).
    `bn_reestimate_batches`: after the last epoch, live BN statistics are recomputed as the
    exact average over this many augmented training batches (`mpq.quant.reestimate_bn_`),
    for the weights training ended with; 0 (the default) keeps the running averages of
    training. Measured with 200 batches on four finished ResNet20 QAT runs (W8, W4, W2 and the
    13x plan), top-1 moved by -0.10 to +0.12 points and test loss by -0.002 to +0.001: noise,
    so it is off by default; Nagel et al. 2022 report real gains on depthwise networks.
    """

    alpha: float = 0.9
    temperature: float = 4.0
    freeze_bn_epoch: int | None = None
    calibration_batches: int = 8
    weight_scale: str = "mse"
    learn_act_scale: bool = False
    act_bits: int = 8
    quantize_joins: bool = True
    bn_reestimate_batches: int = 0

    def __post_init__(self):
        if not 0 <= self.alpha <= 1:
            raise UsageError(f"qat.alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise UsageError(f"qat.temperature must be positive, got {self.temperature}")
        if self.weight_scale not in ("mse", "max", "lsq"):
            raise UsageError(f"qat.weight_scale must be mse, max or lsq; got {self.weight_scale!r}")
        if not 2 <= self.act_bits <= 8:
            raise UsageError(f"qat.act_bits must be in 2..8, got {self.act_bits}")
        if self.calibration_batches < 1:
            raise UsageError("qat.calibration_batches must be >= 1")
        if self.bn_reestimate_batches < 0:
            raise UsageError("qat.bn_reestimate_batches must be >= 0 (0: keep the statistics "
                             "of training)")


@dataclass
class QATRecipe(Recipe):
    """A recipe with a `qat` section; `train` then holds the fine-tuning schedule."""

    qat: QATConfig = field(default_factory=QATConfig)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      labels: torch.Tensor, *, alpha: float, temperature: float):
    """Returns (loss, {"kd": ..., "ce": ...}); see the module docstring for the formula."""
    t = temperature
    kd = F.kl_div(F.log_softmax(student_logits / t, dim=1),
                  F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True) * (t * t)
    ce = F.cross_entropy(student_logits, labels)
    return alpha * kd + (1 - alpha) * ce, {"kd": kd.detach(), "ce": ce.detach()}


def load_teacher(source: str | os.PathLike, *, model_name: str, num_classes: int,
                 normalization: dict | None = None, payload: dict | None = None) -> nn.Module:
    """Loads an FP32 teacher (an mpq checkpoint, a plain state dict or torchvision weights: see
    `mpq.checkpoint.fp32_payload`; or its already loaded `payload`), refusing one of another
    architecture or class count (or, when `normalization` is given and the teacher records
    its own, one trained on differently normalised inputs)."""
    if payload is None:
        payload = fp32_payload(source, model_name=model_name, num_classes=num_classes)
    if payload.get("kind", "fp32") != "fp32":
        raise UsageError(f"teacher {source} is a {payload.get('kind')} checkpoint; the teacher "
                         f"must be an FP32 model")
    model = model_from_checkpoint(payload, expect_model=model_name, path=source)
    if payload["model"].get("num_classes") != num_classes:
        raise UsageError(f"teacher {source} has {payload['model'].get('num_classes')} classes, "
                         f"the recipe {num_classes}")
    theirs = payload.get("normalization")
    if normalization is not None and theirs is not None and theirs != normalization:
        raise UsageError(f"teacher {source} was trained with normalization {theirs}, the recipe "
                         f"uses {normalization}; set data.mean and data.std to the teacher's")
    return model


def quantized_model(model: nn.Module, plan: Plan, cfg: QATConfig, *,
                    input_size: int) -> nn.Module:
    """`prepare_qat` with the recipe's settings and a dummy input of the right size."""
    example = (torch.zeros(2, 3, input_size, input_size),)
    return prepare_qat(model, plan, example_inputs=example, weight_mode=cfg.weight_scale,
                       learn_act_scale=cfg.learn_act_scale, quantize_joins=cfg.quantize_joins)


def train_qat(recipe: QATRecipe, *, plan: Plan, teacher: str | os.PathLike,
              out_dir: str | os.PathLike, data_root=None, device: str | torch.device = "auto",
              progress: bool = True, log: bool = True, ptq: bool = False) -> dict:
    """The QAT stage: fine-tunes `plan` applied to the teacher; returns and writes metrics.

    With `ptq`, no training: calibrate, fold BN, evaluate and save (post-training quantization,
    the baseline QAT has to beat), in the same checkpoint format.

    Writes `out_dir/model.pt` (the QAT checkpoint, carrying its plan), `checkpoint_last.pt`,
    `plan.json`, `metrics.json` and `tb/` (each loss term, accuracy, learning rate and the
    per-layer weight quantization error).
    """
    from .trainer import evaluate, fit, make_loaders, model_meta, resolve_device, write_metrics

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
    train_loader, test_loader = make_loaders(recipe, data_root=data_root, device=device,
                                             progress=progress, classes=payload.get("classes"))
    teacher_model = fp32.to(device).eval()
    for p in teacher_model.parameters():
        p.requires_grad_(False)
    memory_format = torch.channels_last if recipe.train.channels_last else torch.preserve_format
    teacher_model = teacher_model.to(memory_format=memory_format)
    student = student.to(device).to(memory_format=memory_format)

    # Calibrate on un-augmented training images, in their fixed order.
    calib = make_loader(train_loader.split, recipe.data, batch_size=recipe.train.batch_size,
                        train=False, device=device, channels_last=recipe.train.channels_last)
    calibrate_(student, (x for i, (x, _) in zip(range(cfg.calibration_batches), calib.epoch(0))))

    freeze_at = cfg.freeze_bn_epoch if cfg.freeze_bn_epoch is not None else \
        recipe.train.epochs

    def on_epoch_start(epoch: int) -> None:
        if epoch >= freeze_at:
            freeze_bn_(student)

    def loss_fn(model, x, y):
        with torch.no_grad():
            t_logits = teacher_model(x)
        logits = model(x)
        loss, terms = distillation_loss(logits, t_logits, y, alpha=cfg.alpha,
                                        temperature=cfg.temperature)
        return loss, logits, terms

    def epoch_logger(writer, model, epoch):
        for name, layer in quant_layers(model).items():
            if layer.w_bits is not None:
                writer.add_scalar(f"quant_error/{name}", layer.weight_error(), epoch)

    def on_train_end(model, final: dict) -> dict:
        if not cfg.bn_reestimate_batches:
            return {}
        batches = islice(train_loader.epoch(recipe.train.epochs), cfg.bn_reestimate_batches)
        if not reestimate_bn_(model, batches):
            return {}
        result = evaluate(model, test_loader, amp=amp)
        return {"top1": result["top1"], "test_loss": result["loss"],
                "top1_before_bn_reestimate": final["top1"],
                "bn_reestimate_batches": cfg.bn_reestimate_batches}

    amp = autocast_dtype(recipe.train.precision, device)
    teacher_top1 = evaluate(teacher_model, test_loader, amp=amp)["top1"]
    meta = {**model_meta(recipe), "kind": "qat", "classes": train_loader.split.classes,
            "plan": plan.to_dict(),
            "qat": {"weight_scale": cfg.weight_scale, "learn_act_scale": cfg.learn_act_scale,
                    "quantize_joins": cfg.quantize_joins, "int8_weight_max": INT8_WEIGHT_MAX}}
    if ptq:
        freeze_bn_(student)
        result = evaluate(student, test_loader, amp=amp)
        metrics = {"top1": result["top1"], "test_loss": result["loss"], "epochs": 0,
                   "train_seconds": 0.0}
        if distributed.is_main():
            save_checkpoint(Path(out_dir) / "model.pt", {
                **meta, "state_dict": student.state_dict(), "epoch": -1, "metrics": metrics,
                "recipe": recipe_to_dict(recipe)})
    else:
        metrics = fit(student, recipe=recipe, train_loader=train_loader,
                      test_loader=test_loader, out_dir=out_dir, meta=meta, loss_fn=loss_fn,
                      progress=progress, log=log, on_epoch_start=on_epoch_start,
                      epoch_logger=epoch_logger, on_train_end=on_train_end)
    metrics.update(teacher_top1=teacher_top1,
                   weight_bytes=weight_bytes(student, model_meta(recipe)),
                   fp32_bytes=fp32_parameter_bytes(fp32))
    metrics["compression"] = metrics["fp32_bytes"] / metrics["weight_bytes"]
    if distributed.is_main():
        plan.save(os.path.join(out_dir, "plan.json"))
        write_metrics(out_dir, metrics)
    return metrics


def fine_tune_qat(teacher: nn.Module, plan: Plan, batches, *, example_inputs: tuple,
                  epochs: int = 1, lr: float = 0.01, cfg: QATConfig | None = None,
                  device: str | torch.device = "cpu") -> nn.Module:
    """QAT with distillation on any model and any data, in one call; returns the fake-quantized
    student in eval mode (ready for `mpq.export.export_model`).

    The recipe-driven `train_qat` adds checkpoints, exact resume, TensorBoard and DDP; this is
    the same training for a user's own loop-free use.

    Args:
        teacher: the FP32 model (not changed).
        plan: bits per layer (e.g. from `mpq.allocate.plan_for_budget`).
        batches: re-iterable (input, label) batches, e.g. a DataLoader: one pass per epoch; its
            first `cfg.calibration_batches` batches calibrate the activation scales.
        example_inputs: inputs for tracing.
        epochs: passes over `batches`; BN is folded for good when they end.
        lr: peak learning rate of SGD (Nesterov momentum 0.9, weight decay 1e-4), cosine decay.
        cfg: distillation and quantizer settings (`QATConfig`).
        device: where to train.
    """
    import itertools

    cfg = cfg or QATConfig()
    device = torch.device(device)
    student = prepare_qat(teacher, plan, example_inputs=example_inputs,
                          weight_mode=cfg.weight_scale, learn_act_scale=cfg.learn_act_scale,
                          quantize_joins=cfg.quantize_joins).to(device)
    teacher = teacher.to(device).eval()
    calibrate_(student, (x.to(device) for x, _ in
                         itertools.islice(iter(batches), cfg.calibration_batches)))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(epochs, 1))
    freeze_at = cfg.freeze_bn_epoch if cfg.freeze_bn_epoch is not None else epochs
    for epoch in range(epochs):
        if epoch >= freeze_at:
            freeze_bn_(student)
        student.train()
        for x, y in batches:
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                t_logits = teacher(x)
            loss, _ = distillation_loss(student(x), t_logits, y, alpha=cfg.alpha,
                                        temperature=cfg.temperature)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"QAT loss became {loss.item()} in epoch {epoch + 1}; "
                                         f"lower lr")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
    freeze_bn_(student)
    return student.eval()


def qat_model_from_checkpoint(payload: dict, *, path="checkpoint") -> nn.Module:
    """Rebuilds a QAT checkpoint's fake-quantized model (architecture, plan, settings)."""
    from .checkpoint import load_state_dict_checked
    from .models import build_model

    spec = payload["model"]
    model = build_model(spec["name"], num_classes=spec["num_classes"])
    settings = payload.get("qat", {})
    cfg = QATConfig(weight_scale=settings.get("weight_scale", "mse"),
                    learn_act_scale=settings.get("learn_act_scale", False),
                    quantize_joins=settings.get("quantize_joins", True))
    qmodel = quantized_model(model, Plan.from_dict(payload["plan"]), cfg,
                             input_size=payload.get("input_size", 32))
    if settings.get("int8_weight_max", 127) != INT8_WEIGHT_MAX:
        full_range_int8_weights_(qmodel)  # trained before 8-bit weights kept within +-64
    load_state_dict_checked(qmodel, payload["state_dict"], what=f"checkpoint {path}")
    return qmodel
