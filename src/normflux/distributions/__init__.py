"""Base distributions."""
from .base import BaseDistribution, CircularUniform, DiagGaussian, Product, Uniform, VonMises
from .conditional import ClassConditionalDiagGaussian, ConditionalDiagGaussian

__all__ = ["BaseDistribution", "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product",
           "ConditionalDiagGaussian", "ClassConditionalDiagGaussian"]
