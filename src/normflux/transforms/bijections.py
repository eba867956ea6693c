"""Elementwise monotone bijections, the pluggable part of coupling and autoregressive layers.

A bijection maps each coordinate ``x_i`` to ``y_i = f(x_i; theta_i)`` where ``theta_i``
(``num_params`` numbers) comes from a conditioner. It has no trainable parameters of its
own; the layer that uses it (:class:`~normflux.transforms.Coupling`, the autoregressive
layer) owns the network. A new bijection (a sum-of-squares polynomial, say) needs only
:meth:`Bijection.num_params`, :meth:`Bijection.forward` and :meth:`Bijection.inverse`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .domains import CIRCLE, DomainSpec
from .splines import rational_quadratic_spline, spline_knots

__all__ = ["Bijection", "Affine", "Additive", "RQSpline"]


class Bijection(nn.Module):
    """An elementwise monotone bijection with externally supplied parameters.

    Subclasses guarantee, for ``x`` of shape ``(batch, n)``, ``params`` of shape
    ``(batch, n, num_params(spec))`` and ``spec`` a :class:`DomainSpec` of the ``n``
    coordinates:

    * ``forward(x, params, spec) -> (y, ladj)`` with ``ladj`` elementwise ``(batch, n)``,
      ``log|dy_i/dx_i|``;
    * ``inverse(y, params, spec) -> (x, ladj)``, ``ladj = log|dx_i/dy_i|``;
    * all-zero parameters give the identity (so that layers start at the identity);
    * no boolean-mask indexing and no in-place writes (``vmap`` and ``torch.compile``).

    The library does not check monotonicity or the parameter layout for a subclass.
    """

    #: domain kinds the bijection supports ("real", "interval", "circle")
    supported_domains: tuple[str, ...] = ("real",)
    #: ladj does not depend on x (a shortcut some layers use)
    constant_jacobian: bool = False

    def num_params(self, spec: DomainSpec) -> int:
        raise NotImplementedError

    def make_spec(self, domains) -> DomainSpec:
        """A :class:`DomainSpec` for ``domains``, checked against :attr:`supported_domains`.

        Raises:
            ValueError: a domain this bijection cannot handle.
        """
        for d in domains:
            if d.kind not in self.supported_domains:
                raise ValueError(f"{type(self).__name__} does not support {d.kind} coordinates "
                                 f"(supported: {', '.join(self.supported_domains)}); "
                                 "use RQSpline for interval and circular coordinates")
        return DomainSpec(domains, getattr(self, "tail_bound", None))

    def forward(self, x: Tensor, params: Tensor, spec: DomainSpec) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor, spec: DomainSpec) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class Affine(Bijection):
    """Affine map ``y = x * exp(s) + t`` with a bounded log-scale.

    The raw scale output ``r`` is squashed as ``s = bound * tanh(r / bound)``, so that
    ``|log-scale| <= bound`` and no unbounded output is exponentiated (the "stable scale"
    of Real NVP / Glow implementations; Dinh et al. 2017, eq. 7; Kingma & Dhariwal 2018
    use a sigmoid for the same purpose). ``params[..., 0]`` is the shift ``t``,
    ``params[..., 1]`` the raw scale ``r``. Real coordinates only.

    Arguments:
        log_scale_bound: the bound on ``|s|`` (default 3, a factor of e^3 ~ 20 per layer).
    """

    def __init__(self, log_scale_bound: float = 3.0):
        super().__init__()
        if not log_scale_bound > 0:
            raise ValueError(f"log_scale_bound must be positive, got {log_scale_bound}")
        self.log_scale_bound = float(log_scale_bound)

    def num_params(self, spec: DomainSpec) -> int:
        return 2

    def _scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        B = self.log_scale_bound
        return params[..., 0], B * torch.tanh(params[..., 1] / B)

    def forward(self, x, params, spec):
        t, s = self._scale(params)
        return x * torch.exp(s) + t, s

    def inverse(self, y, params, spec):
        t, s = self._scale(params)
        return (y - t) * torch.exp(-s), -s

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"


class Additive(Bijection):
    """Volume-preserving shift ``y = x + t`` (NICE; Dinh et al. 2015, eq. 5). ``ladj = 0``."""

    constant_jacobian = True

    def num_params(self, spec: DomainSpec) -> int:
        return 1

    def forward(self, x, params, spec):
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y, params, spec):
        return y - params[..., 0], torch.zeros_like(y)


class RQSpline(Bijection):
    """Monotone rational-quadratic spline on real, interval and circular coordinates.

    Durkan et al., "Neural Spline Flows" (NeurIPS 2019), eq. 4, with the knots of
    :func:`~normflux.transforms.splines.spline_knots`:

    * ``real``: the spline on ``[-tail_bound, tail_bound]``, the identity outside (linear
      tails, ``ladj = 0``); ``3K - 1`` parameters when every coordinate is real;
    * ``interval(a, b)``: the spline on ``[a, b]`` with free boundary slopes (inputs
      outside ``[a, b]`` pass unchanged);
    * ``circle``: angles are first wrapped into ``[-pi, pi)``; the spline fixes ``-pi``
      and ``pi`` and has equal slopes there, a diffeomorphism of the circle (Rezende et
      al., "Normalizing flows on tori and spheres", ICML 2020, section 3.2). Compose with
      :class:`~normflux.transforms.CircularShift` so that the fixed point moves.

    With any non-real coordinate every coordinate takes ``3K + 1`` parameters (unused
    entries are ignored).

    Arguments:
        bins: number of bins ``K`` (default 8).
        tail_bound: ``B`` for real coordinates (default 3).
        min_bin_width, min_bin_height, min_derivative: numerical floors (default 1e-3).
    """

    supported_domains = ("real", "interval", "circle")

    def __init__(self, bins: int = 8, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                 min_bin_height: float = 1e-3, min_derivative: float = 1e-3):
        super().__init__()
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        if not tail_bound > 0:
            raise ValueError(f"tail_bound must be positive, got {tail_bound}")
        self.bins = int(bins)
        self.tail_bound = float(tail_bound)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative

    def num_params(self, spec: DomainSpec) -> int:
        return 3 * self.bins - 1 if spec.all_real else 3 * self.bins + 1

    def _knots(self, params: Tensor, spec: DomainSpec):
        return spline_knots(params, spec.low.to(params.dtype), spec.high.to(params.dtype),
                            None if spec.all_real else spec.kind, bins=self.bins,
                            min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height,
                            min_derivative=self.min_derivative)

    def forward(self, x, params, spec):
        x = spec.wrap(x)
        return rational_quadratic_spline(x, *self._knots(params, spec))

    def inverse(self, y, params, spec):
        y = spec.wrap(y)
        return rational_quadratic_spline(y, *self._knots(params, spec), inverse=True)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, tail_bound={self.tail_bound}"
