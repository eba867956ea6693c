"""Invertible transforms (data -> base in the forward direction)."""
from .autoregressive import MaskedAutoregressive
from .base import Chain, Inverse, Transform, check_context
from .bijections import Additive, Affine, Bijection, RQSpline
from .coupling import Coupling, make_mask
from .domains import Domain, DomainSpec, as_domains, circle, interval, real
from .linear import LULinear
from .normalization import ActNorm, BatchNorm
from .permutations import CircularShift, Permutation
from .planar import Planar, Radial, Sylvester
from .splines import rational_quadratic_spline, spline_knots

__all__ = [
    "Transform", "Chain", "Inverse", "check_context",
    "Bijection", "Affine", "Additive", "RQSpline",
    "Coupling", "make_mask", "MaskedAutoregressive", "LULinear", "ActNorm", "BatchNorm",
    "Planar", "Radial", "Sylvester", "Permutation", "CircularShift",
    "Domain", "DomainSpec", "as_domains", "real", "interval", "circle",
    "rational_quadratic_spline", "spline_knots",
]
