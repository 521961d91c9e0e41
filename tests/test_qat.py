import copy
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import run_script
from mpq.checkpoint import (load_checkpoint, model_from_checkpoint, qat_model_from_checkpoint,
                            save_checkpoint)
from mpq.config import recipe_from_dict
from mpq.models import build_model
from mpq.qat import QATRecipe, distillation_loss, train_qat
from mpq.quant import (QuantConfig, QuantConv, calibrate_, freeze_bn_, prepare_qat, quant_layers,
                       quantizable_layers, reestimate_bn_, uniform_plan)


def test_distillation_loss_equals_hand_computed_value():
    s = torch.tensor([[2.0, 0.5, -1.0], [0.1, 0.2, 0.3]])
    t = torch.tensor([[1.0, 1.5, -0.5], [0.3, -0.2, 0.9]])
    y = torch.tensor([0, 2])
    alpha, temp = 0.7, 3.0
    kl = 0.0
    for row in range(2):
        pt = [math.exp(v / temp) for v in t[row].tolist()]
        ps = [math.exp(v / temp) for v in s[row].tolist()]
        pt = [v / sum(pt) for v in pt]
        ps = [v / sum(ps) for v in ps]
        kl += sum(a * math.log(a / b) for a, b in zip(pt, ps))
    kl = kl / 2 * temp ** 2  # batchmean, times T^2
    ce = -sum(math.log(math.exp(s[r, y[r]].item()) / sum(math.exp(v) for v in s[r].tolist()))
              for r in range(2)) / 2
    loss, terms = distillation_loss(s, t, y, alpha=alpha, temperature=temp)
    assert loss.item() == pytest.approx(alpha * kl + (1 - alpha) * ce, rel=1e-5)
    assert terms["kd"].item() == pytest.approx(kl, rel=1e-5)
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-5)


def _trained_bn_resnet20():
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10)
    model.train()
    with torch.no_grad():  # give BN non-trivial statistics
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16) * 2 + 0.5)
    return model.eval()


def test_prepare_folds_every_bn_and_quantizes_every_layer():
    model = _trained_bn_resnet20()
    names = quantizable_layers(model)
    qmodel = prepare_qat(model, uniform_plan("resnet20", names, w_bits=8),
                         example_inputs=(torch.zeros(1, 3, 16, 16),))
    assert sorted(quant_layers(qmodel)) == sorted(names) and len(names) == 22
    assert not [m for m in qmodel.modules()
                if isinstance(m, torch.nn.BatchNorm2d) and not any(
                    getattr(q, "bn", None) is m for q in qmodel.modules())]
    assert all(q.bn is not None for n, q in quant_layers(qmodel).items() if n != "fc")
    acts = [n for n, _ in qmodel.named_modules() if n.startswith("act_quant_")]
    # One quantizer per tensor: the input, the stem's output, per block its inner activation
    # and its conv branch, the 2 projection shortcuts, 8 block outputs feeding the next block
    # (conv1 and shortcut share it), the classifier's input.
    assert len(acts) == 1 + 1 + 9 * 2 + 2 + 8 + 1
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 9
    for add in adds:
        assert all(a.op == "call_module" and a.target.startswith("act_quant_") for a in add.args)
    x = torch.randn(8, 3, 16, 16)
    calibrate_(qmodel, [x])
    with torch.no_grad():
        rel = (qmodel.eval()(x) - model(x)).norm() / model(x).norm()
    assert rel < 0.05  # W8A8 stays close to FP32


def _calibrated_resnet20(bits, mode, x=None):
    """A fake-quantized ResNet20 (16x16 inputs) with live BN, calibrated on `x`, in eval mode;
    and the convs with a BN."""
    model = _trained_bn_resnet20()
    qmodel = prepare_qat(model, uniform_plan("resnet20", quantizable_layers(model), w_bits=bits),
                         example_inputs=(torch.zeros(1, 3, 16, 16),),
                         config=QuantConfig(weight_scale=mode))
    calibrate_(qmodel, [torch.randn(8, 3, 16, 16) if x is None else x])
    convs = [m for m in qmodel.modules() if isinstance(m, QuantConv) and m.bn is not None]
    return qmodel.eval(), convs


@pytest.mark.parametrize("mode", ["mse", "lsq"])
def test_frozen_bn_training_forward_is_the_eval_forward_and_freezing_keeps_function(mode):
    x = torch.randn(8, 3, 16, 16)
    qmodel, _ = _calibrated_resnet20(4, mode, x)
    with torch.no_grad():
        before = qmodel(x)
        freeze_bn_(qmodel)
        after_eval = qmodel(x)
        after_train = qmodel.train()(x)
    assert all(bool(m.bn_frozen) for m in qmodel.modules() if isinstance(m, QuantConv))
    assert torch.allclose(before, after_eval, atol=1e-5)
    assert torch.equal(after_eval, after_train)  # what is trained is what is exported


@pytest.mark.parametrize("mode", ["mse", "max", "lsq"])
def test_the_grid_of_a_folded_weight_does_not_move_with_bn_statistics(mode):
    # A learned (lsq) scale is learned for the unfolded weight: when BN's running variance
    # moves (every training step), each weight stays on the same integer. Learned for the
    # folded weight instead, ResNet20's 13x plan fell to 68% in eval after 3 epochs.
    from mpq.export import int_weight

    qmodel, convs = _calibrated_resnet20(2, mode)
    before = [int_weight(m)[0] for m in convs]
    with torch.no_grad():
        for m in convs:
            m.bn.running_var.mul_(torch.linspace(0.5, 2.0, len(m.bn.running_var)))
    after = [int_weight(m)[0] for m in convs]
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("mode", ["mse", "lsq"])
def test_reestimate_bn_sets_the_exact_batch_statistics_and_changes_nothing_else(mode):
    qmodel, convs = _calibrated_resnet20(2, mode)
    qmodel.train()
    with torch.no_grad():  # a few training steps' worth of running statistics
        qmodel(torch.randn(8, 3, 16, 16))
    convs[1].freeze_bn_()
    live = [m for m in qmodel.modules() if isinstance(m, QuantConv) and m.bn is not None
            and not bool(m.bn_frozen)]
    inputs = {m: [] for m in live}
    hooks = [m.register_forward_pre_hook(lambda mod, args: inputs[mod].append(args[0].clone()))
             for m in live]
    before = copy.deepcopy(qmodel.state_dict())
    convs[5].eval()  # a mix of modes, to be restored
    modes = {name: m.training for name, m in qmodel.named_modules()}
    batches = [(torch.randn(6, 3, 16, 16) * 1.5, None) for _ in range(3)]

    assert reestimate_bn_(qmodel, batches) == 3
    for h in hooks:
        h.remove()
    assert {name: m.training for name, m in qmodel.named_modules()} == modes
    after = qmodel.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    live_bns = {id(m.bn) for m in live}
    stats = {f"{n}.{b}" for n, bn in qmodel.named_modules(remove_duplicate=False)
             if id(bn) in live_bns
             for b in ("running_mean", "running_var", "num_batches_tracked")}
    if mode == "mse":  # its `scale` is a copy of the scale each forward recomputes
        changed = {k for k in changed if not k.endswith("weight_quant.scale")}
    # Only live BN statistics: weights, scales, quantizer state and the frozen conv untouched.
    assert changed and changed <= stats
    qmodel.eval()
    for m in live:
        # What the conv computed: its input through its quantized weight (the same on any fold).
        f = m._bn_factor().detach().reshape(-1, 1, 1, 1)
        w = m.quant_weight(m.layer.weight * f) / f
        outs = [m.layer._conv_forward(x, w, m.layer.bias) for x in inputs[m]]
        assert len(outs) == 3
        mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
        var = torch.stack([o.transpose(0, 1).flatten(1).var(1) for o in outs]).mean(0)
        assert torch.allclose(m.bn.running_mean, mean, rtol=1e-4, atol=1e-5)
        assert torch.allclose(m.bn.running_var, var, rtol=1e-4, atol=1e-5)
        assert m.bn.momentum == 0.1
    with pytest.raises(ValueError, match="at least one batch"):
        reestimate_bn_(qmodel, [])


def test_tiny_qat_run_and_eval_command_agree(tmp_path, tiny_teacher, tiny_recipe_dict):
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "bn_reestimate_batches": 2}
    # QAT's learning rate (as in recipes/resnet20_cifar10_qat.yaml), not the teacher's 0.05:
    # at 0.05 this 2-epoch run is chaotic, and a 1e-5 change of one gradient moved it 9 points.
    tiny_recipe_dict["train"]["lr"] = 0.01
    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=8)
    metrics = train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "qat",
                        device="cpu", progress=False, log=False)
    for key in ("top1", "teacher_top1", "epochs", "weight_bytes", "top1_before_bn_reestimate"):
        assert key in metrics
    # W8A8 keeps the teacher's accuracy (a broken fold or STE fell to chance, 25%, here).
    assert metrics["top1"] >= metrics["teacher_top1"] - 10 and metrics["compression"] > 3.5
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "qat" / "model.pt",
                        "--quiet")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == f"top1={metrics['top1']:.2f}"
    saved = load_checkpoint(tmp_path / "qat" / "model.pt")
    assert saved["kind"] == "qat" and saved["plan"] == plan.to_dict()
    # A finished run resumed re-estimates BN from the same batches: the same model again.
    again = train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "qat",
                      device="cpu", progress=False, log=False)
    assert again["top1"] == metrics["top1"]
    resaved = load_checkpoint(tmp_path / "qat" / "model.pt")["state_dict"]
    assert all(torch.equal(resaved[k], v) for k, v in saved["state_dict"].items())


def qat_args(tmp_path, write_recipe, tiny_recipe_dict, teacher, *extra):
    return ["train.py", "--recipe", write_recipe(tiny_recipe_dict), "--device", "cpu", "--quiet",
            "--out", tmp_path / "qat", "--teacher", teacher, *extra]


def _usage_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.stderr


def test_bad_qat_input(tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher)
    _usage_error(run_script(*args, "--bits", "9"), "outside 2..8")
    _usage_error(run_script(*args[:-2], "--teacher", tmp_path / "none.pt", "--bits", "4"),
                 "does not exist")
    plan = uniform_plan("resnet20", ["conv1", "layer9.conv"], w_bits=4)
    plan.save(tmp_path / "plan.json")
    _usage_error(run_script(*args, "--plan", tmp_path / "plan.json"),
                 "names no layer of the model: layer9.conv")
    other = {"model": {"name": "resnet18", "num_classes": 4},
             "state_dict": build_model("resnet18", num_classes=4).state_dict(),
             "normalization": {"mean": [0.5] * 3, "std": [0.5] * 3}, "kind": "fp32"}
    save_checkpoint(tmp_path / "r18.pt", other)
    _usage_error(run_script(*args[:-2], "--teacher", tmp_path / "r18.pt", "--bits", "4"),
                 "holds a 'resnet18' model, but 'resnet20' was expected")
    _usage_error(run_script(*args[:-2], "--bits", "4"), "needs --teacher")
    _usage_error(run_script(*args, "--bits", "4", "--set", "data.mean=[0.1, 0.1, 0.1]"),
                 "set data.mean and data.std to the teacher's")
    _usage_error(run_script(*args, "--bits", "2", "--set", "qat.weight_ste=all"),
                 "qat.weight_ste must be clip or identity")
    _usage_error(run_script(*args, "--bits", "2", "--set", "qat.weight_ste=identity",
                            "--set", "qat.weight_scale=lsq"), "needs qat.weight_scale mse or max")
    assert not (tmp_path / "qat").exists()


def test_a_run_of_another_plan_is_refused_not_resumed(tmp_path, tiny_teacher, tiny_recipe_dict,
                                                     write_recipe):
    tiny_recipe_dict["train"]["epochs"] = 1
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export")
    assert run_script(*args, "--bits", "4").returncode == 0
    before = (tmp_path / "qat" / "model.pt").read_bytes()
    # 3-bit weights have the 4-bit ones' shapes: only the plan tells the runs apart.
    _usage_error(run_script(*args, "--bits", "3"), "holds a run of another plan")
    assert (tmp_path / "qat" / "model.pt").read_bytes() == before
    assert run_script(*args, "--bits", "4").returncode == 0  # its own plan resumes


def test_a_run_from_before_a_qat_setting_existed_resumes_only_at_its_default(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    from mpq.checkpoint import load_checkpoint, save_checkpoint

    tiny_recipe_dict["train"]["epochs"] = 1
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export")
    assert run_script(*args, "--bits", "2").returncode == 0
    last = tmp_path / "qat" / "checkpoint_last.pt"
    state = load_checkpoint(last)
    del state["qat"]["weight_ste"]  # as an mpq from before qat.weight_ste wrote it
    del state["recipe"]["qat"]["weight_ste"]
    save_checkpoint(last, state)
    _usage_error(run_script(*args, "--bits", "2", "--set", "qat.weight_ste=identity"),
                 "different recipe (differs in: qat.weight_ste)")
    assert run_script(*args, "--bits", "2").returncode == 0  # it trained with clip, the default


def test_a_run_resumes_with_its_plan_whatever_the_search_scored_it_on_this_cpu(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    """A parked run resumes on another CPU, whose search finds the same bits with scores that
    differ in their last digits; other bits are another run."""
    tiny_recipe_dict["train"]["epochs"] = 1
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export")
    assert run_script(*args, "--bits", "4").returncode == 0
    recorded = json.loads((tmp_path / "qat" / "plan.json").read_text())
    for score in (1.5521411895751953, 1.5522509962320328):
        (tmp_path / "plan.json").write_text(json.dumps({**recorded, "score": score}))
        assert run_script(*args, "--plan", tmp_path / "plan.json").returncode == 0
    layers = {k: {**v, "w_bits": 3} for k, v in recorded["layers"].items()}
    (tmp_path / "plan.json").write_text(json.dumps({**recorded, "layers": layers}))
    _usage_error(run_script(*args, "--plan", tmp_path / "plan.json"),
                 "holds a run of another plan")


def test_kl_direction_is_teacher_to_student():
    s = torch.tensor([[3.0, 0.0]])
    t = torch.tensor([[0.0, 0.0]])
    _, terms = distillation_loss(s, t, torch.tensor([0]), alpha=1.0, temperature=1.0)
    p_t, log_p_s = F.softmax(t, 1), F.log_softmax(s, 1)
    expected = (p_t * (p_t.log() - log_p_s)).sum()
    assert terms["kd"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_qat_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, tiny_teacher,
                                                               tiny_recipe_dict, write_recipe):
    from conftest import kill_mid_epoch_and_resume

    tiny_recipe_dict["train"]["epochs"] = 4
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    # Killed in epoch 2 of 4, which progressive lowering trains a bit above the plan's 3 bits.
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "freeze_bn_epoch": 2,
                               "progressive_bits": 2}
    kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict),
                               "--teacher", tiny_teacher, "--bits", "3", "--no-export"], tmp_path)


def test_a_run_that_freezes_oscillating_weights_resumes_exactly_and_says_how_many(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    from conftest import kill_mid_epoch_and_resume

    tiny_recipe_dict["train"]["epochs"] = 3
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "freeze_oscillations": 0.02}
    kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict),
                               "--teacher", tiny_teacher, "--bits", "2", "--no-export"], tmp_path)
    metrics = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert 0 < metrics["frozen_fraction"] < 0.5
    state = load_checkpoint(tmp_path / "killed" / "model.pt")["state_dict"]
    frozen = sum(int(v.sum()) for k, v in state.items() if k.endswith("weight_quant.frozen"))
    weights = sum(v.numel() for k, v in state.items() if k.endswith("weight_quant.frozen"))
    assert frozen / weights == pytest.approx(metrics["frozen_fraction"])
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "killed" / "tb"))
    events.Reload()
    shares = [e.value for e in events.Scalars("frozen/all")]  # one per epoch, never falling
    assert len(shares) == 3 and shares == sorted(shares)
    assert shares[-1] == pytest.approx(metrics["frozen_fraction"])


def test_progressive_lowering_resumes_exactly_from_inside_an_epoch(tmp_path, tiny_teacher,
                                                                    tiny_recipe_dict,
                                                                    write_recipe):
    """Killed right after a mid-epoch checkpoint of an epoch trained above the plan's bits: the
    grid it resumes on, and the clipping ratio searched for it, are those of the straight run."""
    from conftest import kill_mid_epoch_and_resume

    tiny_recipe_dict["train"].update(epochs=3, checkpoint_steps=3)
    tiny_recipe_dict["data"]["synthetic_train_size"] = 960
    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "progressive_bits": 2}
    kill_mid_epoch_and_resume(["train.py", "--recipe", write_recipe(tiny_recipe_dict),
                               "--teacher", tiny_teacher, "--bits", "2", "--no-export"], tmp_path,
                              from_partial=True)


def test_progressive_lowering_trains_above_the_plan_then_at_it():
    from mpq.config import TrainConfig
    from mpq.errors import UsageError
    from mpq.qat import QATConfig, epoch_start
    from mpq.quant.primitives import weight_range

    model = _trained_bn_resnet20()
    names = quantizable_layers(model)
    plan = uniform_plan("resnet20", names, w_bits=2)
    plan.layers["conv1"]["w_bits"], plan.layers["fc"]["w_bits"] = 8, 4
    student = prepare_qat(model, plan, example_inputs=(torch.zeros(1, 3, 16, 16),))
    layers = quant_layers(student)
    hook = epoch_start(student, QATConfig(progressive_bits=2), TrainConfig(epochs=5), 10)
    for epoch, want in ((0, (8, 4, 6)), (1, (8, 3, 5)), (2, (8, 2, 4)), (4, (8, 2, 4))):
        hook(epoch)
        got = tuple(layers[n].weight_quant for n in ("conv1", "layer1.0.conv1", "fc"))
        assert tuple(q.bits for q in got) == want, epoch
        assert all((q.qmin, q.qmax) == weight_range(q.bits) for q in got)
    with pytest.raises(UsageError, match="leaves no epoch"):  # 15 steps of 10: 2 epochs
        epoch_start(student, QATConfig(progressive_bits=2),
                    TrainConfig(epochs=5, max_steps=15), 10)
    with pytest.raises(UsageError, match="lsq"):
        QATConfig(progressive_bits=1, weight_scale="lsq")
    with pytest.raises(UsageError, match="one or the other"):
        QATConfig(progressive_bits=1, freeze_oscillations=0.02)


@pytest.mark.parametrize("hold", [{"freeze_ratio_epoch": 2}, {"freeze_ratio_at": 0.4}])
def test_the_clipping_ratio_is_held_from_freeze_ratio_epoch_on_and_steps_still_count(hold):
    from mpq.config import TrainConfig
    from mpq.errors import UsageError
    from mpq.qat import QATConfig, epoch_start

    model = _trained_bn_resnet20()
    plan = uniform_plan("resnet20", quantizable_layers(model), w_bits=2)
    student = prepare_qat(model, plan, example_inputs=(torch.zeros(1, 3, 16, 16),))
    x = torch.randn(4, 3, 16, 16)
    calibrate_(student, [x])
    student.train()
    quants = [m.weight_quant for m in quant_layers(student).values()]
    for q in quants:
        q.refresh_every = 1  # every training step is a refresh, unless held
    hook = epoch_start(student, QATConfig(**hold), TrainConfig(epochs=5), 10)  # from epoch 2

    def step_and_ratios():
        student(x).sum().backward()
        with torch.no_grad():  # move every weight, as an optimiser step would
            for p in student.parameters():
                p.mul_(1 + 0.3 * torch.randn_like(p))
        return [q.ratio.clone() for q in quants], [int(q.steps) for q in quants]

    for epoch, held in ((0, False), (1, False), (2, True), (3, True), (1, False)):
        hook(epoch)  # as a resumed run calls it: the epoch alone decides
        before, steps = step_and_ratios()
        after, steps_after = step_and_ratios()
        assert all(b + 1 == a for b, a in zip(steps, steps_after)), epoch
        assert all(torch.equal(b, a) for b, a in zip(before, after)) == held, epoch
    QATConfig(freeze_ratio_epoch=2, weight_scale="lsq")  # no ratio to hold: nothing changes
    with pytest.raises(UsageError, match="freeze_ratio_epoch"):
        QATConfig(freeze_ratio_epoch=-1)
    with pytest.raises(UsageError, match="wider grid"):  # the plan's bits from epoch 2 on
        QATConfig(freeze_ratio_epoch=2, progressive_bits=2)
    QATConfig(freeze_ratio_epoch=3, progressive_bits=2)


def test_freeze_ratio_at_scales_with_the_schedule_and_is_checked_against_it():
    from mpq.config import TrainConfig
    from mpq.errors import UsageError
    from mpq.qat import QATConfig, epoch_start

    model = _trained_bn_resnet20()
    plan = uniform_plan("resnet20", quantizable_layers(model), w_bits=2)
    student = prepare_qat(model, plan, example_inputs=(torch.zeros(1, 3, 16, 16),))
    quants = [m.weight_quant for m in quant_layers(student).values()]

    def first_held(cfg, train, steps_per_epoch=10):
        hook = epoch_start(student, cfg, train, steps_per_epoch)
        for epoch in range(100):
            hook(epoch)
            if not quants[0].refreshing:
                assert not any(q.refreshing for q in quants)
                return epoch

    assert first_held(QATConfig(freeze_ratio_at=0.7), TrainConfig(epochs=10)) == 7
    assert first_held(QATConfig(freeze_ratio_at=0.7), TrainConfig(epochs=60)) == 42
    # under train.max_steps the schedule is 6 epochs of 10 steps, not 60
    assert first_held(QATConfig(freeze_ratio_at=0.7), TrainConfig(epochs=60, max_steps=60)) == 4
    assert first_held(QATConfig(freeze_ratio_at=0.0), TrainConfig(epochs=10)) == 0
    with pytest.raises(UsageError, match="wider grid"):  # epoch 2 of 4, plan's bits from 2
        epoch_start(student, QATConfig(freeze_ratio_at=0.5, progressive_bits=2),
                    TrainConfig(epochs=4, warmup_epochs=0), 10)
    epoch_start(student, QATConfig(freeze_ratio_at=0.5, progressive_bits=2),
                TrainConfig(epochs=10), 10)
    with pytest.raises(UsageError, match="one of them"):
        QATConfig(freeze_ratio_at=0.7, freeze_ratio_epoch=7)
    with pytest.raises(UsageError, match="freeze_ratio_at"):
        QATConfig(freeze_ratio_at=1.5)


def test_ptq_calibrates_without_training_and_saves_an_evaluable_checkpoint(
        tmp_path, tiny_teacher, tiny_recipe_dict):
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=8)
    metrics = train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "ptq",
                        device="cpu", progress=False, log=False, ptq=True)
    assert metrics["epochs"] == 0 and not (tmp_path / "ptq" / "checkpoint_last.pt").exists()
    # W8A8 PTQ of a trained model loses little (chance is 25% on these 4 classes).
    assert metrics["top1"] >= metrics["teacher_top1"] - 10
    saved = load_checkpoint(tmp_path / "ptq" / "model.pt")
    student = model_from_checkpoint(saved)
    assert all(bool(m.bn_frozen) for m in quant_layers(student).values() if hasattr(m, "bn"))
    result = run_script("-m", "mpq", "eval", "--checkpoint", tmp_path / "ptq" / "model.pt",
                        "--quiet")
    assert result.stdout.strip().splitlines()[-1] == f"top1={metrics['top1']:.2f}"


def test_activation_quantizer_rounds_in_float32_under_bf16_autocast():
    from mpq.quant.modules import ActQuantizer

    q = ActQuantizer(8)
    x = torch.linspace(0, 6, 1001)
    q.start_calibration()
    q(x)
    q.finish_calibration()
    with torch.no_grad():
        grid = q(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = q(x.to(torch.bfloat16))
    def on_grid(t):
        return ((t / q.scale) - (t / q.scale).round()).abs().max() < 1e-4

    assert on_grid(grid)
    # bf16 input values are the float32 ones rounded to 8 significant bits: the output lies on
    # the same float32 grid, one level at most from where float32 input put it
    assert under.dtype == torch.float32
    assert on_grid(under)
    assert (under - grid).abs().max() <= q.scale * 1.0001


def test_fine_tune_qat_and_train_qat_take_the_same_steps(tmp_path, tiny_teacher,
                                                         tiny_recipe_dict):
    """The Python API and the recipe-driven stage share one distillation step, optimiser and
    schedule: the same batches give the same weights."""
    from mpq.data import make_loader
    from mpq.qat import fine_tune_qat
    from mpq.trainer import make_loaders

    tiny_recipe_dict["qat"] = {"calibration_batches": 2, "weight_scale": "lsq"}
    tiny_recipe_dict["train"].update(lr=0.01, max_steps=5, schedule="onecycle", weight_decay=3e-4)
    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=4)
    train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "qat", device="cpu",
              progress=False, log=False)
    by_recipe = model_from_checkpoint(load_checkpoint(tmp_path / "qat" / "model.pt"))
    freeze_bn_(by_recipe)

    train_loader, _ = make_loaders(recipe, device=torch.device("cpu"), progress=False)
    batches = list(train_loader.epoch(0))[:5]  # what train_qat's 5 steps saw
    calib = make_loader(train_loader.split, recipe.data, batch_size=recipe.train.batch_size,
                        train=False, device=torch.device("cpu"))
    calibration = [x for _, (x, _) in zip(range(2), calib.epoch(0))]
    by_api = fine_tune_qat(teacher, plan, batches, example_inputs=(batches[0][0][:1],),
                           cfg=recipe.qat, train=recipe.train, calibration=calibration)
    got, want = by_api.state_dict(), by_recipe.state_dict()
    assert got.keys() == want.keys()
    moved = [k for k in want if not torch.equal(got[k], want[k])]
    assert not moved, moved[:5]
    first = quant_layers(by_api)["conv1"]
    assert not torch.equal(first.layer.weight, quant_layers(
        prepare_qat(teacher, plan, example_inputs=(batches[0][0][:1],)))["conv1"].layer.weight)


def test_the_epochs_logging_leaves_the_quantizers_step_counts_to_training(tmp_path, tiny_teacher,
                                                                         tiny_recipe_dict):
    """An mse weight quantizer refreshes its clipping ratio every `refresh_every` training
    steps by its own count; the TensorBoard logging after each epoch reads every layer's grid
    and must not count as a step (it did: 391 a 390-step epoch), or logging moves training."""
    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)  # mse scales, 2 epochs of 12 steps
    teacher = model_from_checkpoint(load_checkpoint(tiny_teacher))
    plan = uniform_plan("resnet20", quantizable_layers(teacher), w_bits=4)
    train_qat(recipe, plan=plan, teacher=tiny_teacher, out_dir=tmp_path / "qat", device="cpu",
              progress=False, log=False)
    state = load_checkpoint(tmp_path / "qat" / "checkpoint_last.pt")["state_dict"]
    counts = {k: int(v) for k, v in state.items() if k.endswith("weight_quant.steps")}
    assert len(counts) == len(plan.layers) and set(counts.values()) == {2 * 12}


@pytest.mark.parametrize("channels_last", [False, True])
def test_every_reported_top1_is_the_float32_one_of_the_exported_model_under_bf16(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe, channels_last):
    """Trained under bf16 autocast, the run reports (metrics.json, its last line, the
    checkpoint) the float32 evaluation of the model it saves: export's fake-quantized top-1,
    `python -m mpq eval`'s, and the teacher's own float32 figure. The losses compare to 1e-6,
    which bf16 evaluation (8 significant bits) misses by orders of magnitude; the student's
    is the same float32 computation as `mpq eval`'s (contiguous, whatever the training's
    memory format), so its loss is the same to the last bit."""
    from mpq.export.run import test_batches_for
    from mpq.trainer import evaluate, make_loaders

    tiny_recipe_dict["train"].update(epochs=1, lr=0.01, precision="bf16",
                                     channels_last=channels_last)
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    out = tmp_path / "qat"
    result = run_script(*qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher,
                                  "--bits", "4"))
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "torch.bfloat16"
    report = json.loads((out / "export" / "export.json").read_text())
    assert metrics["top1"] == report["fake_quant_top1"] == report["qat_top1"]
    assert result.stdout.strip().splitlines()[-1] == f"top1={metrics['top1']:.2f}"
    evaluated = run_script("-m", "mpq", "eval", "--checkpoint", out / "model.pt", "--quiet")
    assert evaluated.stdout.strip().splitlines()[-1] == f"top1={metrics['top1']:.2f}"

    recipe = recipe_from_dict(tiny_recipe_dict, QATRecipe)
    _, test = make_loaders(recipe, device=torch.device("cpu"), progress=False)
    saved = load_checkpoint(out / "model.pt")
    assert saved["metrics"]["top1"] == metrics["top1"]
    student = evaluate(model_from_checkpoint(saved), test_batches_for(saved, progress=False))
    assert student["top1"] == metrics["top1"]
    assert student["loss"] == metrics["test_loss"]
    teacher = evaluate(model_from_checkpoint(load_checkpoint(tiny_teacher)), test)
    assert teacher["top1"] == metrics["teacher_top1"]


def test_a_warm_start_begins_where_its_checkpoint_ended_and_counts_its_epochs(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    tiny_recipe_dict["train"].update(epochs=1, lr=0.01)
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export",
                    "--bits", "2")
    assert run_script(*args).returncode == 0
    first = load_checkpoint(tmp_path / "qat" / "model.pt")
    # A rate too small to move anything: what the warm run ends with is what it started from.
    tiny_recipe_dict["train"]["lr"] = 1e-9
    warm = [*qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export",
                      "--bits", "2"), "--init", tmp_path / "qat" / "model.pt"]
    warm[warm.index("--out") + 1] = tmp_path / "warm"
    result = run_script(*warm)
    assert result.returncode == 0, result.stderr
    ended = load_checkpoint(tmp_path / "warm" / "model.pt")["state_dict"]
    trained = [k for k, p in qat_model_from_checkpoint(first).named_parameters()
               if p.requires_grad]
    # (BN's running statistics, and the weight scales that follow them, move at any rate.)
    for key in trained:
        assert torch.allclose(ended[key], first["state_dict"][key], atol=1e-6), key
    assert not torch.allclose(ended["conv1.layer.weight"], load_checkpoint(
        tiny_teacher)["state_dict"]["conv1.weight"], atol=1e-3)
    metrics = json.loads((tmp_path / "warm" / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["init"]["epochs"] == 1
    assert metrics["init"]["top1"] == first["metrics"]["top1"]
    # A warm start of the warm run counts both before it.
    again = list(warm)
    again[again.index("--out") + 1] = tmp_path / "warm2"
    again[again.index("--init") + 1] = tmp_path / "warm" / "model.pt"
    assert run_script(*again).returncode == 0
    assert json.loads((tmp_path / "warm2" / "metrics.json").read_text())["init"]["epochs"] == 2
    # The file is needed only to start: the finished run resumes without it, not from another.
    moved = tmp_path / "elsewhere.pt"
    (tmp_path / "qat" / "model.pt").rename(moved)
    assert run_script(*warm).returncode == 0
    shutil.copy(tmp_path / "warm2" / "model.pt", tmp_path / "qat" / "model.pt")
    _usage_error(run_script(*warm), "holds a run of another init")
    _usage_error(run_script(*warm[:-2]), "holds a run of another init")  # nor from the teacher


def test_a_warm_start_is_refused_from_another_plan_setting_or_kind(
        tmp_path, tiny_teacher, tiny_recipe_dict, write_recipe):
    tiny_recipe_dict["train"].update(epochs=1, lr=0.01)
    tiny_recipe_dict["qat"] = {"calibration_batches": 2}
    args = qat_args(tmp_path, write_recipe, tiny_recipe_dict, tiny_teacher, "--no-export")
    assert run_script(*args, "--bits", "2").returncode == 0
    init = tmp_path / "qat" / "model.pt"
    args[args.index("--out") + 1] = tmp_path / "warm"
    _usage_error(run_script(*args, "--bits", "4", "--init", init),
                 "was trained on another plan than this command's")
    _usage_error(run_script(*args, "--bits", "2", "--init", init, "--set",
                            "qat.weight_scale=max"), "other quantizer settings (differs in: "
                 "weight_scale)")
    _usage_error(run_script(*args, "--bits", "2", "--init", tiny_teacher),
                 "is not a QAT checkpoint (kind 'fp32')")
    _usage_error(run_script(*args, "--bits", "2", "--init", tmp_path / "none.pt"),
                 "does not exist")
    _usage_error(run_script(*args, "--bits", "2", "--init", init, "--ptq"),
                 "use one or the other")
    assert not (tmp_path / "warm").exists()
