"""Export: the packed `model.mpq`, an int8 ONNX (QDQ) model, a PyTorch int8 model."""

from .mpqfile import header_bytes, int_weight, load_mpq, read_mpq, save_mpq

__all__ = ["header_bytes", "int_weight", "load_mpq", "read_mpq", "save_mpq"]
