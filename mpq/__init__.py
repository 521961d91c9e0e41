"""mpq: mixed-precision quantization for PyTorch models.

Stages, each one call: `train_fp32` (a teacher), `layer_sensitivity` (Hessian per layer),
`plan_for_budget` / `solve` (exact allocation under a byte budget), `run_search` (sensitivity +
solver + Optuna for a recipe), `fine_tune_qat` (QAT with distillation on any model and data;
`train_qat` for a recipe, resumable), `export_model` (packed file, int8 ONNX and PyTorch int8,
checked against the fake-quantized model).
"""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import DataConfig, ModelConfig, Recipe, TrainConfig, load_recipe
from .data import BatchLoader, load_split
from .errors import UsageError
from .allocate import parse_budget, plan_for_budget, solve
from .export import export_checkpoint, export_model
from .hessian import layer_sensitivity
from .models import ResNet20, build_model
from .qat import fine_tune_qat, train_qat
from .quant import Plan, load_plan, prepare_qat
from .search import run_search
from .trainer import evaluate, train_fp32

__version__ = "0.1.0"

__all__ = [
    "BatchLoader",
    "DataConfig",
    "ModelConfig",
    "Plan",
    "Recipe",
    "ResNet20",
    "TrainConfig",
    "UsageError",
    "build_model",
    "evaluate",
    "export_checkpoint",
    "export_model",
    "fine_tune_qat",
    "layer_sensitivity",
    "load_checkpoint",
    "load_plan",
    "load_recipe",
    "load_split",
    "model_from_checkpoint",
    "parse_budget",
    "plan_for_budget",
    "prepare_qat",
    "run_search",
    "save_checkpoint",
    "solve",
    "train_fp32",
    "train_qat",
]
