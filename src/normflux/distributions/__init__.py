"""Base distributions."""
from .conditional import ClassConditionalDiagGaussian, ConditionalDiagGaussian
from .base import BaseDistribution, CircularUniform, DiagGaussian, Product, Uniform, VonMises

__all__ = ["BaseDistribution", "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product",
           "ConditionalDiagGaussian", "ClassConditionalDiagGaussian"]
