"""Export: the packed `model.mpq`, an int8 ONNX (QDQ) model, a PyTorch int8 model, and the
stage that writes and checks them all (`export_model`, `export_checkpoint`)."""

from .mpqfile import header_bytes, int_weight, load_mpq, read_mpq, save_mpq
from .run import ExportCheckFailed, export_checkpoint, export_model

__all__ = ["ExportCheckFailed", "export_checkpoint", "export_model", "header_bytes",
           "int_weight", "load_mpq", "read_mpq", "save_mpq"]
