"""Base distributions: modules with ``log_prob(z, context=None)`` and ``sample(n, context=None)``."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor, nn

from .._checks import flag, integer, real
from ..transforms.base import check_context

__all__ = ["BaseDistribution", "DiagGaussian", "Uniform", "VonMises", "CircularUniform", "Product"]


def _vector(value, features: int, name: str, positive: bool = False) -> Tensor:
    """A constructor argument given as a scalar or ``(features,)``, as a ``(features,)``
    tensor of the default dtype: finite, and ``> 0`` with ``positive``.

    Raises:
        ValueError: not a real number or a sequence / tensor of ``features`` of them, a
            non-finite entry (also after rounding to the default dtype), or with
            ``positive`` an entry ``<= 0``.
    """
    if isinstance(value, numbers.Number) and not isinstance(value, Tensor):
        value = real(name, value, low=0.0 if positive else None, low_open=positive)
    try:
        t = torch.as_tensor(value, dtype=torch.get_default_dtype())
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a real number or a sequence of {features} real "
                         f"numbers, got {value!r}") from None
    if t.dim() == 0:
        t = t.expand(features).clone()
    if t.shape != (features,):
        raise ValueError(f"{name} must be a scalar or have shape ({features},), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite (in {t.dtype}), got {t.tolist()}")
    if positive and not bool((t > 0).all()):
        raise ValueError(f"{name} must be positive (> 0 in {t.dtype}), got {t.tolist()}")
    return t


def _shape(shape: Sequence[int]) -> str:
    return f"(batch, {', '.join(map(str, shape))})"


class BaseDistribution(nn.Module):
    """Base class: a distribution over ``event_shape`` whose tensors follow ``.to()``.

    Subclasses implement ``log_prob(z, context=None) -> (batch,)`` for ``z`` of shape
    ``(batch, *event_shape)`` (exactly one batch dimension) and the module's dtype, and
    ``sample(n, context=None) -> (n, *event_shape)``. A conditional base takes a context
    of shape ``(n, context_features)`` (one row per sample; ``(1, context_features)``
    broadcasts) in both. Samples are drawn with the module's dtype and device.

    Subclasses validate their arguments with :meth:`_check_log_prob` and
    :meth:`_check_sample` (shape and dtype checks only: no tensor reductions, so they
    are cheap and free under ``torch.compile``; a NaN in ``z`` is not looked for).
    """

    event_shape: tuple[int, ...] = ()
    context_features: int | None = None

    def _dtype(self) -> torch.dtype | None:
        """The dtype of the module's first floating-point tensor (``None`` without one);
        subclasses override it with a direct attribute lookup."""
        for t in self.parameters():
            if t.is_floating_point():
                return t.dtype
        for t in self.buffers():
            if t.is_floating_point():
                return t.dtype
        return None

    def _check_log_prob(self, z: Tensor, context: Tensor | None) -> None:
        """Check ``log_prob``'s arguments.

        Raises:
            TypeError: ``z`` (or ``context``) is not a :class:`torch.Tensor`.
            ValueError: ``z`` is not of shape ``(batch, *event_shape)``, not
                floating-point or not of the distribution's dtype; a bad context (see
                :func:`~normflux.transforms.base.check_context`, including one of
                another dtype than the distribution's).
        """
        ev = self.event_shape
        dtype = self._dtype()
        if not isinstance(z, Tensor):
            raise TypeError(f"{type(self).__name__}.log_prob expects z to be a torch.Tensor, "
                            f"got {type(z).__name__}")
        if z.dim() != 1 + len(ev) or tuple(z.shape[1:]) != tuple(ev):
            hint = ""
            if tuple(z.shape) == tuple(ev):
                hint = f"; for a single event use z.reshape(1, {', '.join(map(str, ev))})"
            elif z.dim() > 1 + len(ev) and tuple(z.shape[z.dim() - len(ev):]) == tuple(ev):
                hint = f"; flatten the batch dimensions with z.reshape(-1, {', '.join(map(str, ev))})"
            raise ValueError(f"{type(self).__name__}.log_prob expects z of shape {_shape(ev)}, "
                             f"got {tuple(z.shape)}{hint}")
        if not z.is_floating_point():
            raise ValueError(f"{type(self).__name__}.log_prob expects a floating-point z, "
                             f"got dtype {z.dtype}")
        if dtype is not None and z.dtype != dtype:
            raise ValueError(f"{type(self).__name__} is {dtype} but z is {z.dtype}; convert one "
                             f"of them (z.to({dtype}) or the distribution's .to({z.dtype}))")
        check_context(context, self.context_features, z.shape[0], type(self).__name__, dtype)

    def _check_sample(self, n, context: Tensor | None) -> int:
        """Check ``sample``'s arguments; returns ``n`` as an ``int``.

        Raises:
            TypeError: ``context`` is not a :class:`torch.Tensor` or ``None``.
            ValueError: ``n`` is not an integer >= 0 (``2.5``, ``-1``, ``None``); a bad
                context (see :meth:`_check_log_prob`).
        """
        n = integer("n", n, minimum=0)
        check_context(context, self.context_features, n, type(self).__name__, self._dtype())
        return n

    def log_prob(self, z: Tensor, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample(self, n: int, context: Tensor | None = None) -> Tensor:
        raise NotImplementedError

    def sample_and_log_prob(self, n: int, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """One draw of ``n`` samples and their log-density.

        Arguments:
            n: number of samples (an integer >= 0).
            context: ``(n, C)`` (or ``(1, C)``) for a conditional base, else ``None``.

        Returns:
            ``(z, log_prob)``: ``(n, *event_shape)`` and ``(n,)`` (nats).

        Raises:
            ValueError: ``n`` is not an integer >= 0; a context where none is expected
                (or none where one is, or of the wrong shape or dtype).
            TypeError: a context that is not a :class:`torch.Tensor`.
        """
        z = self.sample(n, context)
        return z, self.log_prob(z, context)


class DiagGaussian(BaseDistribution):
    """Diagonal Gaussian ``N(loc, diag(scale^2))`` on ``R^D``, fixed or trainable.

    Arguments:
        features: ``D``, an integer >= 1.
        loc, scale: finite scalars or ``(D,)`` (default 0 and 1), ``scale > 0``.
        trainable: make ``loc`` and ``log_scale`` parameters (else buffers).

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats); ``sample(n) -> (n, D)``.

    Raises:
        ValueError: at construction, ``features`` not an integer >= 1, ``loc`` or
            ``scale`` not finite or of the wrong shape, ``scale <= 0``, ``trainable``
            not a bool. At call time, ``z`` not of shape ``(batch, D)``, not
            floating-point or not of the distribution's dtype; ``n`` not an integer
            >= 0; a context is passed (the distribution is unconditional).
        TypeError: ``z`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int, loc=0.0, scale=1.0, trainable: bool = False):
        super().__init__()
        features = integer("features", features, minimum=1)
        self.event_shape = (features,)
        loc = _vector(loc, features, "loc")
        scale = _vector(scale, features, "scale", positive=True)
        if flag("trainable", trainable):
            self.loc = nn.Parameter(loc)
            self.log_scale = nn.Parameter(scale.log())
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_scale", scale.log())

    def _dtype(self):
        return self.loc.dtype

    def log_prob(self, z, context=None):
        self._check_log_prob(z, context)
        u = (z - self.loc) * torch.exp(-self.log_scale)
        # four passes over (batch, D) where the sum of the elementwise terms took six
        return -0.5 * u.square().sum(-1) - (self.log_scale.sum()
                                             + 0.5 * math.log(2 * math.pi) * u.shape[-1])

    def sample(self, n, context=None):
        n = self._check_sample(n, context)
        eps = torch.randn(n, *self.event_shape, dtype=self.loc.dtype, device=self.loc.device)
        return self.loc + torch.exp(self.log_scale) * eps


class Uniform(BaseDistribution):
    """Uniform distribution on the box ``[low, high]^D``; ``log_prob`` is ``-inf`` outside.

    Arguments:
        features: ``D``, an integer >= 1.
        low, high: finite scalars or ``(D,)`` with ``low < high`` (and a finite width
            ``high - low``).

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats, ``-sum log(high - low)`` inside);
        ``sample(n) -> (n, D)``.

    Raises:
        ValueError: at construction, ``features`` not an integer >= 1, ``low`` or
            ``high`` not finite or of the wrong shape, ``low >= high`` or an infinite
            width. At call time, ``z`` not of shape ``(batch, D)``, not floating-point
            or not of the distribution's dtype; ``n`` not an integer >= 0; a context
            is passed (the distribution is unconditional).
        TypeError: ``z`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int, low=0.0, high=1.0):
        super().__init__()
        features = integer("features", features, minimum=1)
        self.event_shape = (features,)
        low, high = _vector(low, features, "low"), _vector(high, features, "high")
        if not bool((low < high).all()):
            raise ValueError(f"Uniform needs low < high, got low={low.tolist()}, "
                             f"high={high.tolist()}")
        if not bool(torch.isfinite(high - low).all()):
            raise ValueError(f"Uniform needs a finite width high - low (in {low.dtype}), got "
                             f"low={low.tolist()}, high={high.tolist()}")
        self.register_buffer("low", low)
        self.register_buffer("high", high)

    def _dtype(self):
        return self.low.dtype

    def log_prob(self, z, context=None):
        self._check_log_prob(z, context)
        inside = ((z >= self.low) & (z <= self.high)).all(-1)
        lp = -torch.log(self.high - self.low).sum().expand(z.shape[0])
        return torch.where(inside, lp, torch.full_like(lp, -math.inf))

    def sample(self, n, context=None):
        n = self._check_sample(n, context)
        u = torch.rand(n, *self.event_shape, dtype=self.low.dtype, device=self.low.device)
        return self.low + (self.high - self.low) * u


class CircularUniform(Uniform):
    """Uniform distribution on the torus ``[-pi, pi)^D`` (angles in radians).

    ``log_prob = -D log(2 pi)`` for every input (angles are taken modulo ``2 pi``).

    Arguments:
        features: ``D``, an integer >= 1.

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats); ``sample(n) -> (n, D)`` in
        ``[-pi, pi)``.

    Raises:
        ValueError: at construction, ``features`` not an integer >= 1. At call time,
            ``z`` not of shape ``(batch, D)``, not floating-point or not of the
            distribution's dtype; ``n`` not an integer >= 0; a context is passed (the
            distribution is unconditional).
        TypeError: ``z`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int):
        super().__init__(features, -math.pi, math.pi)

    def log_prob(self, z, context=None):
        self._check_log_prob(z, context)
        return (-math.log(2 * math.pi) * z.shape[-1]) * torch.ones_like(z[..., 0])

    def sample(self, n, context=None):
        n = self._check_sample(n, context)
        u = torch.rand(n, *self.event_shape, dtype=self.low.dtype, device=self.low.device)
        return (2 * u - 1) * math.pi  # exact pi in every dtype (the buffers are rounded)


class VonMises(BaseDistribution):
    """Independent von Mises distributions on ``[-pi, pi)^D``.

    ``p(phi) = exp(kappa cos(phi - mu)) / (2 pi I0(kappa))`` per coordinate; sampling by
    ``torch.distributions.VonMises`` (Best & Fisher 1979 rejection), wrapped to
    ``[-pi, pi)``.

    Arguments:
        features: ``D``, an integer >= 1.
        loc: ``mu``, finite scalar or ``(D,)`` (radians).
        concentration: ``kappa > 0``, finite scalar or ``(D,)``.
        trainable: make ``loc`` and ``log_concentration`` parameters.

    Shapes:
        ``log_prob(z (batch, D)) -> (batch,)`` (nats; ``z`` in radians, any real value);
        ``sample(n) -> (n, D)`` in ``[-pi, pi)``.

    Raises:
        ValueError: at construction, ``features`` not an integer >= 1, ``loc`` or
            ``concentration`` not finite or of the wrong shape, ``concentration <= 0``,
            ``trainable`` not a bool. At call time, ``z`` not of shape ``(batch, D)``,
            not floating-point or not of the distribution's dtype; ``n`` not an integer
            >= 0; a context is passed (the distribution is unconditional).
        TypeError: ``z`` is not a :class:`torch.Tensor`.
    """

    def __init__(self, features: int, loc=0.0, concentration=1.0, trainable: bool = False):
        super().__init__()
        features = integer("features", features, minimum=1)
        self.event_shape = (features,)
        loc = _vector(loc, features, "loc")
        kappa = _vector(concentration, features, "concentration", positive=True)
        if flag("trainable", trainable):
            self.loc = nn.Parameter(loc)
            self.log_concentration = nn.Parameter(kappa.log())
        else:
            self.register_buffer("loc", loc)
            self.register_buffer("log_concentration", kappa.log())

    def _dtype(self):
        return self.loc.dtype

    def log_prob(self, z, context=None):
        self._check_log_prob(z, context)
        k = torch.exp(self.log_concentration)
        # log I0(k) = log(i0e(k)) + k, stable for large k
        lp = k * torch.cos(z - self.loc) - math.log(2 * math.pi) - (torch.log(torch.special.i0e(k)) + k)
        return lp.sum(-1)

    def sample(self, n, context=None):
        n = self._check_sample(n, context)
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
        TypeError: a part that is not a :class:`BaseDistribution`.
        ValueError: no parts, parts with different context widths, or a part whose
            event shape is not 1-D. At call time, ``z`` not of shape
            ``(batch, sum D_i)``, not floating-point or not of the distribution's dtype;
            ``n`` not an integer >= 0; a context where none is expected (or none where
            one is, or of the wrong shape or dtype).
    """

    def __init__(self, parts: Sequence[BaseDistribution]):
        super().__init__()
        parts = list(parts)
        if not parts:
            raise ValueError("Product needs at least one part")
        for i, p in enumerate(parts):
            if not isinstance(p, BaseDistribution):
                raise TypeError(f"Product parts must be normflux BaseDistributions, got "
                                f"{type(p).__name__} at index {i}")
            if len(p.event_shape) != 1:
                raise ValueError("Product joins vector distributions only, got event shape "
                                 f"{tuple(p.event_shape)} at index {i}")
        self.parts = nn.ModuleList(parts)
        self.sizes = [p.event_shape[0] for p in parts]
        self.event_shape = (sum(self.sizes),)
        feats = {p.context_features for p in parts if p.context_features is not None}
        if len(feats) > 1:
            raise ValueError(f"Product parts expect different context widths {sorted(feats)}")
        self.context_features = feats.pop() if feats else None

    def _dtype(self):
        return self.parts[0]._dtype()

    def log_prob(self, z, context=None):
        self._check_log_prob(z, context)
        out = 0
        for p, zi in zip(self.parts, torch.split(z, self.sizes, dim=-1)):
            out = out + p.log_prob(zi, context if p.context_features is not None else None)
        return out

    def sample(self, n, context=None):
        n = self._check_sample(n, context)
        return torch.cat([p.sample(n, context if p.context_features is not None else None)
                          for p in self.parts], dim=-1)
