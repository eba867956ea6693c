"""normflux: normalizing flows in PyTorch.

Every discrete flow family in one package, exact, fast and conditional. See
``docs/design.md`` for the contracts (direction, shapes, return values).
"""
from . import distributions, metrics, nets, targets, testing, transforms
from .distributions import (
    CircularUniform,
    ClassConditionalDiagGaussian,
    ConditionalDiagGaussian,
    DiagGaussian,
    Product,
    Uniform,
    VonMises,
)
from .flows import Flow, FlowDistribution
from .transforms import (
    ActNorm,
    Additive,
    Affine,
    BatchNorm,
    Chain,
    CircularShift,
    Coupling,
    Inverse,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    Planar,
    Radial,
    RQSpline,
    Sylvester,
    Transform,
    circle,
    interval,
    real,
)

__version__ = "0.1.0"

__all__ = [
    "Flow", "FlowDistribution", "Transform", "Chain", "Inverse", "Coupling",
    "MaskedAutoregressive", "Permutation", "LULinear", "ActNorm", "BatchNorm", "Planar",
    "Radial", "Sylvester",
    "CircularShift", "Affine", "Additive", "RQSpline", "real", "interval", "circle",
    "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product",
    "ConditionalDiagGaussian", "ClassConditionalDiagGaussian",
    "distributions", "metrics", "nets", "targets", "transforms", "testing", "models",
    "training",
]

# submodules that use the names above (imported last)
from . import models, training  # noqa: E402, I001
