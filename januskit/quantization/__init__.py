"""Weight-only int8 / int4 quantisation of the LLM and its heads, for CPU (and CUDA) inference.

    spec.py     what is quantised (QuantSpec: method, group size, layers) and how a folder names it
    codec.py    float weight <-> portable int8 / int4 tensors (the arithmetic)
    kernels.py  torch's weight-only matmul kernels, their packing and shape limits
    qlinear.py  Int8Linear / Int4Linear, the QuantLinear modules
    model.py    quantize_model: a loaded model, in place
    load.py     streaming load: a float folder quantised as it is read, or a quantised folder
    folder.py   quantize_folder: write a quantised folder (`januskit quantize`)
    guard.py    check_trainable: training refuses quantised models and folders

docs/quantization.md has the formats, the kernels' limits and the measured errors and memory.
"""
from .folder import quantize_folder
from .guard import check_trainable
from .load import load_quantized, read_quantization
from .model import quantize_model, quantized_modules
from .qlinear import Int4Linear, Int8Linear, QuantLinear
from .spec import METHODS, QuantizationError, QuantSpec

__all__ = ["quantize_model", "quantized_modules", "load_quantized", "read_quantization", "quantize_folder", "check_trainable",
           "QuantLinear", "Int8Linear", "Int4Linear", "QuantSpec", "QuantizationError", "METHODS"]
