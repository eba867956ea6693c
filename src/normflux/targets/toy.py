"""Toy targets with ``log_prob`` (and exact ``sample`` where it exists)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Target", "Cylinder", "TwoMoons", "RingOfGaussians"]


def _check(x: Tensor, dim: int, name: str) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[-1] != dim:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name}.log_prob expects x of shape (batch, {dim}), got {shape}")


class Target(nn.Module):
    """A target density: ``log_prob(x) -> (batch,)``, possibly unnormalised.

    Subclasses implement ``log_prob(x)`` for ``x`` of shape ``(batch, dim)`` (nats) and,
    where an exact sampler exists, ``sample(n, generator=None) -> (n, dim)``; the base
    ``sample`` raises ``NotImplementedError``.

    Attributes:
        dim: dimension of ``x``.
        log_normalizer: ``log Z`` where known (0 for normalised targets), else ``None``.
        domains: the coordinate domains (for building a flow on the right space).
    """

    dim: int = 2
    log_normalizer: float | None = None
    domains: tuple = ("real", "real")

    def log_prob(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no exact sampler")


class Cylinder(Target):
    """The cylinder density of normflows' Figure 1 (Stimper et al., JOSS 2023).

    ``p(x, phi) = N(x | 0, 1) * vonMises(phi | mu = 3x, kappa = 1)`` on
    ``R x [-pi, pi)``; normalised exactly (``log_normalizer = 0``). ``x[:, 0]`` is the
    real coordinate, ``x[:, 1]`` the angle in radians (any real value; the density is
    2 pi-periodic in it). :meth:`sample` is exact (von Mises by rejection, wrapped to
    ``[-pi, pi)``); with a ``generator`` it reseeds torch's global generator from it for
    the draw and restores the global state afterwards.

    Arguments:
        slope: the ``3`` in ``mu = 3x`` (radians per unit of ``x``).
        concentration: ``kappa > 0``.

    Shapes:
        ``log_prob(x (batch, 2)) -> (batch,)`` (nats); ``sample(n) -> (n, 2)``.

    Raises:
        ValueError: :meth:`log_prob` of an ``x`` that is not a ``(batch, 2)`` tensor.
    """

    dim = 2
    log_normalizer = 0.0
    domains = ("real", "circle")

    def __init__(self, slope: float = 3.0, concentration: float = 1.0):
        super().__init__()
        self.slope = float(slope)
        self.concentration = float(concentration)

    def log_prob(self, x: Tensor) -> Tensor:
        _check(x, 2, "Cylinder")
        k = self.concentration
        log_i0 = math.log(torch.special.i0e(torch.tensor(k, dtype=torch.float64)).item()) + k
        lx = -0.5 * x[:, 0] ** 2 - 0.5 * math.log(2 * math.pi)
        lphi = k * torch.cos(x[:, 1] - self.slope * x[:, 0]) - math.log(2 * math.pi) - log_i0
        return lx + lphi

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        if generator is not None:
            state = torch.random.get_rng_state()
            torch.manual_seed(int(torch.randint(2**62, (1,), generator=generator)))
        try:
            x = torch.randn(n)
            phi = torch.distributions.VonMises(self.slope * x, torch.full((n,), self.concentration)).sample()
        finally:
            if generator is not None:
                torch.random.set_rng_state(state)
        phi = torch.remainder(phi + math.pi, 2 * math.pi) - math.pi
        return torch.stack([x, phi], dim=1)


class TwoMoons(Target):
    """Unnormalised two-moons energy of Rezende & Mohamed (2015, Table 1, ``U_1``)-style.

    ``log p~(x) = -0.5 ((|x| - 2) / 0.2)^2 - 0.5 ((|x_0| - 2) / 0.3)^2
    + log(1 + exp(-4 |x_0| / 0.09))``, as in normflows' ``TwoMoons`` target: a ring of
    radius 2 cut into two arcs, not the two-moons data set of
    :func:`normflux.data.two_moons` (scikit-learn's half circles). No exact sampler;
    ``log_normalizer`` is unknown (``None``). Takes no arguments.

    Shapes:
        ``log_prob(x (batch, 2)) -> (batch,)`` (nats, unnormalised).

    Raises:
        ValueError: :meth:`log_prob` of an ``x`` that is not a ``(batch, 2)`` tensor.
        NotImplementedError: :meth:`sample`.
    """

    dim = 2

    def __init__(self):
        super().__init__()

    def log_prob(self, x: Tensor) -> Tensor:
        _check(x, 2, "TwoMoons")
        a = x[:, 0].abs()
        r = torch.linalg.vector_norm(x, dim=1)
        return (-0.5 * ((r - 2) / 0.2) ** 2 - 0.5 * ((a - 2) / 0.3) ** 2
                + torch.nn.functional.softplus(-4 * a / 0.09))


class RingOfGaussians(Target):
    """Equal mixture of ``k`` isotropic Gaussians (std ``scale``) on a circle of ``radius``.

    Normalised (``log_normalizer = 0``), with an exact sampler. Defaults: 8 modes,
    radius 4, scale 0.5 (the "ring of 8 Gaussians" toy of FFJORD, Grathwohl et al. 2019).
    Mode ``j`` is centred at angle ``2 pi j / k``.

    Arguments:
        k: number of modes.
        radius: radius of the ring of means.
        scale: standard deviation of each component.

    Shapes:
        ``log_prob(x (batch, 2)) -> (batch,)`` (nats); ``sample(n, generator) -> (n, 2)``.

    Raises:
        ValueError: :meth:`log_prob` of an ``x`` that is not a ``(batch, 2)`` tensor.
    """

    dim = 2
    log_normalizer = 0.0

    def __init__(self, k: int = 8, radius: float = 4.0, scale: float = 0.5):
        super().__init__()
        angles = torch.arange(k, dtype=torch.get_default_dtype()) * (2 * math.pi / k)
        self.register_buffer("means", radius * torch.stack([angles.cos(), angles.sin()], 1))
        self.scale = float(scale)

    def log_prob(self, x: Tensor) -> Tensor:
        _check(x, 2, "RingOfGaussians")
        d2 = ((x[:, None, :] - self.means.to(x.dtype)) ** 2).sum(-1)
        comp = -0.5 * d2 / self.scale**2 - 2 * math.log(self.scale) - math.log(2 * math.pi)
        return torch.logsumexp(comp, dim=1) - math.log(self.means.shape[0])

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        idx = torch.randint(self.means.shape[0], (n,), generator=generator)
        return self.means[idx] + self.scale * torch.randn(n, 2, generator=generator)
