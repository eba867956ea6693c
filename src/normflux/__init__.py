"""normflux: normalizing flows in PyTorch.

Every discrete flow family in one package, exact, fast and conditional. See
``docs/design.md`` for the contracts (direction, shapes, return values).
"""
from . import distributions, metrics, nets, targets, transforms
from .distributions import CircularUniform, DiagGaussian, Product, Uniform, VonMises
from .flows import Flow, FlowDistribution
from .transforms import (Additive, Affine, Chain, CircularShift, Coupling, Inverse, Permutation,
                         RQSpline, Transform, circle, interval, real)

__version__ = "0.1.0"

__all__ = [
    "Flow", "FlowDistribution", "Transform", "Chain", "Inverse", "Coupling", "Permutation",
    "CircularShift", "Affine", "Additive", "RQSpline", "real", "interval", "circle",
    "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product",
    "distributions", "metrics", "nets", "targets", "transforms",
]
