"""Target densities for variational inference and toy density estimation."""
from .toy import Cylinder, RingOfGaussians, Target, TwoMoons

__all__ = ["Target", "Cylinder", "TwoMoons", "RingOfGaussians"]
