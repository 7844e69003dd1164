"""The model classes; `build_model` picks one from a config's `arch`."""
from __future__ import annotations

from torch import nn


def build_model(c) -> nn.Module:
    """JanusModel for a JanusConfig, JanusFlowModel for a JanusFlowConfig."""
    if c.arch == "janusflow":
        from .janusflow import JanusFlowModel

        return JanusFlowModel(c)
    from .janus import JanusModel

    return JanusModel(c)


def vision_prefix(c) -> str:
    """State-dict prefix of the understanding encoder (the same SigLIP under two names)."""
    return "vision_und_enc_model." if c.arch == "janusflow" else "vision_model."


def count_params(c) -> int:
    """Parameters of the model a config describes (built on the meta device: no memory, no weights read)."""
    import torch

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(c).parameters())
