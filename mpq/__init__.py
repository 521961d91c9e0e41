"""mpq: mixed-precision quantization for PyTorch models.

Stages, each one call: `train_fp32` (a teacher), and the ones that follow it in the pipeline.
"""

from .checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from .config import DataConfig, ModelConfig, Recipe, TrainConfig, load_recipe
from .data import BatchLoader, load_split
from .errors import UsageError
from .models import ResNet20, build_model
from .trainer import evaluate, train_fp32

__version__ = "0.1.0"

__all__ = [
    "BatchLoader",
    "DataConfig",
    "ModelConfig",
    "Recipe",
    "ResNet20",
    "TrainConfig",
    "UsageError",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "load_recipe",
    "load_split",
    "model_from_checkpoint",
    "save_checkpoint",
    "train_fp32",
]
