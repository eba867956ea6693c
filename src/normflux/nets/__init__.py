"""Conditioner networks."""
from .made import MADE, MaskedLinear, autoregressive_order
from .mlp import MLP

__all__ = ["MLP", "MADE", "MaskedLinear", "autoregressive_order"]
