"""Checkpoints: written atomically, read with `torch.load(weights_only=True)`, checked on load.

A checkpoint is a plain dict of tensors and plain data, so loading it can never run code, and
a `package.module:factory` model it names is built only when the caller names the same one or
passes `allow_factory` (`mpq.models.check_factory_allowed`). A field missing or of the wrong
type is a `UsageError` naming it (`check_payload`):

    format: "mpq.checkpoint", version: 1
    kind: "fp32" | "qat"
    model: {"name": ..., "num_classes": ...}    # rebuilds the architecture
    normalization: {"mean": [...], "std": [...]}  # 0..1 pixel units; travels with the model
    input_size: int
    state_dict: {...}
    recipe: {...}                                 # the resolved recipe that produced it
    epoch, metrics, and for resumable ones: optimizer, scheduler, rng
"""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .errors import UsageError
from .files import atomic_path
from .models import build_model, check_factory_allowed
from .quant import INT8_WEIGHT_MAX, Plan, QuantConfig, prepare_qat
from .quant.modules import full_range_int8_weights_

__all__ = ["CHECKPOINT_VERSION", "check_payload", "data_config", "fp32_payload", "load_checkpoint",
           "load_teacher", "model_from_checkpoint", "model_meta", "qat_model_from_checkpoint",
           "save_checkpoint"]

CHECKPOINT_FORMAT = "mpq.checkpoint"
CHECKPOINT_VERSION = 1


def save_checkpoint(path: str | os.PathLike, payload: dict) -> None:
    """Writes `payload` to `path` atomically: a crash leaves the old file or the new, never half."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **payload}
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save(payload, fh)  # to a handle: a path's name would go into the archive


def _read(path: Path, map_location):
    if not path.is_file():
        raise UsageError(f"checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile,
            pickle.UnpicklingError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UsageError(f"checkpoint {path} is corrupted or not a torch checkpoint, or one "
                         f"that only loads by running code ({first[:200]}); a pickled "
                         f"nn.Module you trust converts once with `python -m mpq wrap "
                         f"--allow-pickle`") from None


def _read_trusted(path: Path):
    """`torch.load` with code execution allowed (the user opted in); falls back to the safe
    reader's messages for what is not a torch file at all."""
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:  # the pickled class is not importable
        raise UsageError(f"{path} holds a pickled object whose code is not importable here "
                         f"({exc}); put its module on PYTHONPATH, or save a state dict "
                         f"instead") from None
    except Exception:  # noqa: BLE001  (corrupt or foreign: the safe reader says which)
        return _read(path, "cpu")


def load_checkpoint(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> dict:
    """Reads an mpq checkpoint safely; a missing, corrupted or foreign file is a `UsageError`."""
    path = Path(path)
    payload = _read(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(f"{path} is not an mpq checkpoint (no format={CHECKPOINT_FORMAT!r} "
                         f"field); train one with train.py")
    if payload.get("version") != CHECKPOINT_VERSION:
        raise UsageError(f"checkpoint {path} has version {payload.get('version')}; this mpq reads "
                         f"version {CHECKPOINT_VERSION}")
    return payload


def load_state_dict_checked(model: nn.Module, state_dict: dict, *, what: str) -> None:
    """`load_state_dict(strict=True)` whose mismatch is a one-line `UsageError`."""
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else lines[0]
        raise UsageError(f"{what} does not fit the model ({detail[:300]})") from None


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _three_numbers(v) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)


def _bits(v) -> bool:
    return isinstance(v, str) and all(c == "-" or c in "2345678" for c in v)


# The fields mpq reads from a checkpoint or a model.mpq header: (test, what it should be).
_FIELDS = {
    "model": (lambda v: isinstance(v, dict), "a mapping with 'name' and 'num_classes'"),
    "model.name": (lambda v: isinstance(v, str) and bool(v), "a model name"),
    "model.num_classes": (_whole, "an integer >= 1"),
    "kind": (lambda v: v in ("fp32", "qat"), "'fp32' or 'qat'"),
    "state_dict": (lambda v: isinstance(v, dict) and all(
        isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in v.items()),
        "a mapping of names to tensors"),
    "plan": (lambda v: isinstance(v, dict), "a bit plan (a mapping)"),
    "qat": (lambda v: isinstance(v, dict), "a mapping of QAT settings"),
    "input_size": (_whole, "an integer >= 1"),
    "normalization": (lambda v: v is None or (isinstance(v, dict) and _three_numbers(
        v.get("mean")) and _three_numbers(v.get("std"))),
        "{'mean': [3 numbers], 'std': [3 numbers]}"),
    "recipe": (lambda v: isinstance(v, dict), "a mapping"),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
                "a list of class names"),
    "w_bits": (_bits, "a string of bit widths 2-8 or '-'"),
    "a_bits": (_bits, "a string of bit widths 2-8 or '-'"),
}
_MISSING = object()


def check_payload(payload: dict, *, source, require: tuple[str, ...] = ()) -> None:
    """Refuses a checkpoint's (or a `model.mpq` header's) payload whose fields are missing or
    of the wrong type with one `UsageError` naming `source` (e.g. "checkpoint runs/a.pt") and
    the field, rather than a `KeyError` later. `model` with its name and class count is always
    required; `require` names more fields; any other field is checked only where present."""
    required = {"model", "model.name", "model.num_classes", *require}
    for field, (test, expected) in _FIELDS.items():
        value = payload
        for part in field.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        if value is _MISSING:
            if field in required:
                raise UsageError(f"{source} is malformed: it has no {field!r} (not a file this "
                                 f"mpq wrote, or one edited since)")
            continue
        if not test(value):
            shown = (f"a {type(value).__name__}" if isinstance(value, (dict, torch.Tensor))
                     else repr(value))
            raise UsageError(f"{source} is malformed: its {field!r} should be {expected}, "
                             f"not {shown[:80]}")


def _build(payload: dict, path, expect_model, allow_factory) -> nn.Module:
    spec = payload["model"]
    check_factory_allowed(spec["name"], source=f"checkpoint {path}", expect_model=expect_model,
                          allow_factory=allow_factory)
    return build_model(spec["name"], num_classes=spec["num_classes"])


def qat_model_from_checkpoint(payload: dict, *, path="checkpoint",
                              expect_model: str | None = None,
                              allow_factory: bool = False) -> nn.Module:
    """Rebuilds a QAT checkpoint's fake-quantized model (architecture, plan, settings); see
    `model_from_checkpoint`."""
    check_payload(payload, source=f"checkpoint {path}", require=("state_dict", "plan"))
    try:
        plan = Plan.from_dict(payload["plan"])
    except UsageError as exc:
        raise UsageError(f"checkpoint {path} has a malformed plan: {exc}") from None
    model = _build(payload, path, expect_model, allow_factory)
    settings = payload.get("qat", {})
    size = payload.get("input_size", 32)
    qmodel = prepare_qat(model, plan, example_inputs=(torch.zeros(2, 3, size, size),),
                         config=QuantConfig.from_dict(settings))
    if settings.get("int8_weight_max", 127) != INT8_WEIGHT_MAX:
        full_range_int8_weights_(qmodel)  # trained before 8-bit weights kept within +-64
    load_state_dict_checked(qmodel, payload["state_dict"], what=f"checkpoint {path}")
    return qmodel


def model_from_checkpoint(payload: dict, *, expect_model: str | None = None,
                          allow_factory: bool = False,
                          path: str | os.PathLike = "checkpoint") -> nn.Module:
    """Rebuilds the model a checkpoint holds (FP32, or fake-quantized for QAT) with its weights.

    Args:
        payload: from `load_checkpoint`; a missing or mistyped field is a `UsageError`.
        expect_model: the model name the caller expects (e.g. its recipe's); a checkpoint of
            another is refused, and a `package.module:factory` it names is built.
        allow_factory: build a `package.module:factory` the file names even when the caller
            named none: that imports the module and calls the factory, so only for a file
            you trust (`mpq.models.check_factory_allowed`).
        path: the file, for messages.
    """
    check_payload(payload, source=f"checkpoint {path}", require=("state_dict",))
    name = payload["model"]["name"]
    if expect_model is not None and name != expect_model:
        raise UsageError(f"checkpoint {path} holds a {name!r} model, but {expect_model!r} was "
                         f"expected; pass a checkpoint of that architecture")
    if payload.get("kind") == "qat":
        return qat_model_from_checkpoint(payload, path=path, expect_model=expect_model,
                                         allow_factory=allow_factory)
    model = _build(payload, path, expect_model, allow_factory)
    load_state_dict_checked(model, payload["state_dict"], what=f"checkpoint {path}")
    return model


TORCHVISION_WEIGHTS = "torchvision:"
IMAGENET_NORMALIZATION = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def _is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def fp32_payload(source: str | os.PathLike, *, model_name: str, num_classes: int,
                 allow_pickle: bool = False) -> dict:
    """An FP32 model as a checkpoint payload, from any of the forms users have one in:

    - an mpq checkpoint (from train.py);
    - a plain state dict of the recipe's model (`torch.save(model.state_dict(), path)`), or a
      dict holding one under `state_dict` or `model`; its normalisation is then unknown
      (`normalization` None) and the recipe's is used;
    - `torchvision:<Weights enum>`, e.g. `torchvision:ResNet18_Weights.IMAGENET1K_V1`:
      torchvision's pretrained weights, downloaded once into torch's hub cache;
    - with `allow_pickle` only, a whole pickled `nn.Module` (`torch.save(model)`): loading it
      runs code from the file, so only for files the user trusts.
    """
    spec = str(source)
    if spec.startswith(TORCHVISION_WEIGHTS):
        return _torchvision_payload(spec, model_name)
    path = Path(source)
    payload = _read_trusted(path) if allow_pickle else _read(path, "cpu")
    if isinstance(payload, nn.Module):
        payload = {k: v for k, v in payload.state_dict().items()}
    if isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT:
        return load_checkpoint(path)
    for state in (payload, *(payload.get(k) for k in ("state_dict", "model")
                             if isinstance(payload, dict))):
        if _is_state_dict(state):
            return {"kind": "fp32", "model": {"name": model_name, "num_classes": num_classes},
                    "state_dict": state, "normalization": None, "source": "state_dict"}
    raise UsageError(f"{path} is neither an mpq checkpoint nor a state dict of tensors; save "
                     f"the model with torch.save(model.state_dict(), path)")


def _torchvision_payload(spec: str, model_name: str) -> dict:
    import torchvision

    name = spec[len(TORCHVISION_WEIGHTS):]
    try:
        weights = torchvision.models.get_weight(name)
    except (KeyError, ValueError, AttributeError):
        raise UsageError(f"{spec}: torchvision has no weights {name!r}; name them as "
                         f"Enum.VALUE, e.g. torchvision:ResNet18_Weights.IMAGENET1K_V1") from None
    builder = torchvision.models.get_model_builder(model_name) \
        if model_name in torchvision.models.list_models() else None
    if builder is None or torchvision.models.get_model_weights(builder) is not type(weights):
        raise UsageError(f"{spec} are weights of another architecture than the recipe's "
                         f"{model_name!r}")
    try:
        state = weights.get_state_dict(progress=True, check_hash=True)
    except (OSError, RuntimeError, ValueError) as exc:  # offline, or a damaged download
        raise UsageError(f"could not fetch {spec} ({str(exc).splitlines()[0][:200]}); offline, "
                         f"fetch {weights.url} elsewhere and pass the file as the teacher") \
            from None
    return {"kind": "fp32", "model": {"name": model_name,
                                      "num_classes": len(weights.meta["categories"])},
            "state_dict": state, "normalization": IMAGENET_NORMALIZATION, "source": spec}


def data_config(payload: dict):
    """The data section a checkpoint (or a packed model.mpq's payload) was made with, normalised
    its way; without a recipe in it, the defaults at its input size (any ImageFolder root)."""
    from .config import DataConfig, recipe_from_dict

    data = (payload.get("recipe") or {}).get("data")
    cfg = recipe_from_dict(data, DataConfig) if data else DataConfig(
        image_size=payload.get("input_size") or DataConfig.image_size)
    if payload.get("normalization"):
        cfg.mean = list(payload["normalization"]["mean"])
        cfg.std = list(payload["normalization"]["std"])
    return cfg


def model_meta(recipe) -> dict:
    """What a checkpoint needs to rebuild and feed its model without the recipe."""
    return {"model": {"name": recipe.model.name, "num_classes": recipe.model.num_classes},
            "normalization": {"mean": list(recipe.data.mean), "std": list(recipe.data.std)},
            "input_size": recipe.data.image_size}


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
