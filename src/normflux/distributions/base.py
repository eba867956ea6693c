"""Base distributions: modules with ``log_prob(z, context=None)`` and ``sample(n, context=None)``."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from ..transforms.base import check_context

__all__ = ["BaseDistribution", "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product"]


def _vector(value, features: int, name: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if t.dim() == 0:
        t = t.expand(features).clone()
    if t.shape != (features,):
        raise ValueError(f"{name} must be a scalar or have shape ({features},), got {tuple(t.shape)}")
    return t


class BaseDistribution(nn.Module):
    """Base class: a distribution over ``event_shape`` whose tensors follow ``.to()``.

    Subclasses implement ``log_prob(z, context=None) -> (batch,)`` for ``z`` of shape
    ``(batch, *event_shape)``, and ``sample(n, context=None) -> (n, *event_shape)``. A
    conditional base takes a context of shape ``(n, context_features)`` (one row per
    sample) in both. Samples are drawn with the module's dtype and device.
    """

    event_shape: tuple[int, ...] = ()
    context_features: int | None = None

    def _ref(self) -> Tensor:
        for t in self.buffers():
            return t
        for t in self.parameters():
            return t
        return torch.empty(0)

    def _check(self, z: Tensor | None, context: Tensor | None, n: int | None = None) -> None:
        batch = z.shape[0] if z is not None else n
        check_context(context, self.context_features, batch, type(self).__name__)

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One draw of ``n`` samples and their log-density.

        Arguments:
            n: number of samples.
            context: ``(n, C)`` (or ``(1, C)``) for a conditional base, else ``None``.

        Returns:
            ``(z, log_prob)``: ``(n, *event_shape)`` and ``(n,)`` (nats).

        Raises:
            ValueError: a context where none is expected (or none where one is, or of
                the wrong shape).
        """
        z = self.sample(n, context)
        return z, self.log_prob(z, context)


class DiagGaussian(BaseDistribution):
    """Diagonal Gaussian ``N(loc, diag(scale^2))`` on ``R^D``, fixed or trainable.

    Arguments:
        features: ``D``.
        loc, scale: scalars or ``(D,)`` (default 0 and 1), ``scale > 0``.
        trainable: make ``loc`` and ``log_scale`` parameters (else buffers).

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats); ``sample(n) -> (n, D)``.

    Raises:
        ValueError: non-positive scale or wrong shapes; a context is passed (the
            distribution is unconditional).
    """

    def __init__(self, features: int, loc=0.0, scale=1.0, trainable: bool = False):
        super().__init__()
        self.event_shape = (int(features),)
        loc = _vector(loc, features, "loc")
        scale = _vector(scale, features, "scale")
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        if trainable:
            self.loc = nn.Parameter(loc)
            self.log_scale = nn.Parameter(scale.log())
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", scale.log())

    def log_prob(self, z, context=None):
        self._check(z, context)
        u = (z - self.loc) * torch.exp(-self.log_scale)
        return (-0.5 * u * u - self.log_scale).sum(-1) - 0.5 * math.log(2 * math.pi) * u.shape[-1]

    def sample(self, n, context=None):
        self._check(None, context, n)
        eps = torch.randn(n, *self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(self.log_scale) * eps


class Uniform(BaseDistribution):
    """Uniform distribution on the box ``[low, high]^D``; ``log_prob`` is ``-inf`` outside.

    Arguments:
        features: ``D``.
        low, high: scalars or ``(D,)`` with ``low < high``.

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats, ``-sum log(high - low)`` inside);
        ``sample(n) -> (n, D)``.

    Raises:
        ValueError: ``low >= high`` or wrong shapes; a context is passed (the
            distribution is unconditional).
    """

    def __init__(self, features: int, low=0.0, high=1.0):
        super().__init__()
        self.event_shape = (int(features),)
        low, high = _vector(low, features, "low"), _vector(high, features, "high")
        if not bool((low < high).all()):
            raise ValueError("Uniform needs low < high")
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def log_prob(self, z, context=None):
        self._check(z, context)
        inside = ((z >= self.low) & (z <= self.high)).all(-1)
        lp = -torch.log(self.high - self.low).sum().expand(z.shape[0])
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def sample(self, n, context=None):
        self._check(None, context, n)
        u = torch.rand(n, *self.event_shape, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u


class CircularUniform(Uniform):
    """Uniform distribution on the torus ``[-pi, pi)^D`` (angles in radians).

    ``log_prob = -D log(2 pi)`` for every input (angles are taken modulo ``2 pi``).

    Arguments:
        features: ``D``.

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats); ``sample(n) -> (n, D)`` in
        ``[-pi, pi)``.

    Raises:
        ValueError: a context is passed (the distribution is unconditional).
    """

    def __init__(self, features: int):
        super().__init__(features, -math.pi, math.pi)

    def log_prob(self, z, context=None):
        self._check(z, context)
        return (-math.log(2 * math.pi) * z.shape[-1]) * torch.ones_like(z[..., 0])

    def sample(self, n, context=None):
        self._check(None, context, n)
        u = torch.rand(n, *self.event_shape, dtype=self.low.dtype, device=self.low.device)
        return (2 * u - 1) * math.pi  # exact pi in every dtype (the buffers are rounded)


class VonMises(BaseDistribution):
    """Independent von Mises distributions on ``[-pi, pi)^D``.

    ``p(phi) = exp(kappa cos(phi - mu)) / (2 pi I0(kappa))`` per coordinate; sampling by
    ``torch.distributions.VonMises`` (Best & Fisher 1979 rejection), wrapped to
    ``[-pi, pi)``.

    Arguments:
        features: ``D``.
        loc: ``mu``, scalar or ``(D,)`` (radians).
        concentration: ``kappa > 0``, scalar or ``(D,)``.
        trainable: make ``loc`` and ``log_concentration`` parameters.

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats; ``z`` in radians, any real value);
        ``sample(n) -> (n, D)`` in ``[-pi, pi)``.

    Raises:
        ValueError: non-positive concentration or wrong shapes; a context is passed
            (the distribution is unconditional).
    """

    def __init__(self, features: int, loc=0.0, concentration=1.0, trainable: bool = False):
        super().__init__()
        self.event_shape = (int(features),)
        loc = _vector(loc, features, "loc")
        kappa = _vector(concentration, features, "concentration")
        if not bool((kappa > 0).all()):
            raise ValueError("concentration must be positive")
        if trainable:
            self.loc = nn.Parameter(loc)
            self.log_concentration = nn.Parameter(kappa.log())
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_concentration", kappa.log())

    def log_prob(self, z, context=None):
        self._check(z, context)
        k = torch.exp(self.log_concentration)
        # log I0(k) = log(i0e(k)) + k, stable for large k
        lp = k * torch.cos(z - self.loc) - math.log(2 * math.pi) - (torch.log(torch.special.i0e(k)) + k)
        return lp.sum(-1)

    def sample(self, n, context=None):
        self._check(None, context, n)
        d = torch.distributions.VonMises(self.loc, torch.exp(self.log_concentration))
        phi = d.sample((n,))
        return torch.remainder(phi + math.pi, 2 * math.pi) - math.pi


class Product(BaseDistribution):
    """Independent joint of vector bases over consecutive coordinate blocks.

    ``Product([DiagGaussian(1), CircularUniform(1)])`` is the base of the cylinder
    example: a Gaussian on ``x`` and a uniform angle ``phi``. ``log_prob`` is the sum of
    the parts' ``log_prob`` on their blocks; samples are concatenated.

    Arguments:
        parts: vector base distributions (event shape ``(D_i,)``); conditional parts all
            receive the same context.

    Shapes:
        ``log_prob(z (batch, sum D_i), context) -> (batch,)`` (nats);
        ``sample(n, context) -> (n, sum D_i)``; ``context``: ``(batch, C)`` when a part
        is conditional.

    Raises:
        ValueError: no parts, or a part whose event shape is not 1-D; at call time, a
            context where none is expected (or none where one is, or of the wrong shape).
    """

    def __init__(self, parts: Sequence[BaseDistribution]):
        super().__init__()
        if not parts:
            raise ValueError("Product needs at least one part")
        for p in parts:
            if len(p.event_shape) != 1:
                raise ValueError("Product joins vector distributions only")
        self.parts = nn.ModuleList(parts)
        self.sizes = [p.event_shape[0] for p in parts]
        self.event_shape = (sum(self.sizes),)
        feats = {p.context_features for p in parts if p.context_features is not None}
        if len(feats) > 1:
            raise ValueError(f"Product parts expect different context widths {sorted(feats)}")
        self.context_features = feats.pop() if feats else None

    def log_prob(self, z, context=None):
        self._check(z, context)
        out = 0
        for p, zi in zip(self.parts, torch.split(z, self.sizes, dim=-1)):
            out = out + p.log_prob(zi, context if p.context_features is not None else None)
        return out

    def sample(self, n, context=None):
        self._check(None, context, n)
        return torch.cat([p.sample(n, context if p.context_features is not None else None)
                          for p in self.parts], dim=-1)
