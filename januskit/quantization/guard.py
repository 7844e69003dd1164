"""The one place a quantised model or folder is refused outright: training. Its weights are integers
in an inference kernel's layout (no gradient, no optimiser state, no state dict)."""
from __future__ import annotations

from pathlib import Path

from torch import nn

from ..checkpoint.official_config import read_config_json
from .load import read_quantization
from .model import quantized_modules
from .spec import QuantizationError

_HOW = "train the float checkpoint it was made from (quantise the result afterwards: `januskit quantize`)"


def check_trainable(source: nn.Module | str | Path) -> None:
    """Raise QuantizationError when `source` (a model, or a checkpoint folder) is quantised."""
    if isinstance(source, nn.Module):
        if layers := quantized_modules(source):
            raise QuantizationError(f"cannot train a quantised model ({len(layers)} quantised layers, e.g. "
                                    f"{layers[0]}): weight-only int8 / int4 is for inference; {_HOW}")
        return
    cfg = Path(source) / "config.json"
    if (spec := read_quantization(read_config_json(cfg), cfg)) is not None:
        raise QuantizationError(f"{source}: a {spec.describe()} quantised checkpoint cannot be trained "
                                f"(weight-only quantisation is for inference); {_HOW}")
