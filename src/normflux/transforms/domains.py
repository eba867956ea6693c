"""Coordinate domains: ``real``, ``interval(a, b)`` and ``circle``.

Every coordinate of a layer declares its domain, so that one layer mixes unbounded,
bounded and circular (periodic) coordinates (Rezende et al., "Normalizing flows on tori
and spheres", ICML 2020). Domains are small immutable values; :class:`DomainSpec` turns a
list of them into tensors (buffers) that the bijections use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch
from torch import Tensor

from .._constants import ConstantsMixin

__all__ = ["Domain", "real", "interval", "circle", "DomainSpec", "as_domains"]

REAL, INTERVAL, CIRCLE = 0, 1, 2


@dataclass(frozen=True)
class Domain:
    """The domain of one coordinate.

    Circular coordinates (and tori as products of circles) follow Rezende et al.,
    "Normalizing flows on tori and spheres" (ICML 2020).

    Attributes:
        kind: ``"real"`` (the real line), ``"interval"`` (the closed interval
            ``[low, high]``) or ``"circle"`` (angles, the half-open ``[low, high)`` with
            ``low`` and ``high`` identified; radians for :data:`circle`).
        low, high: the bounds (``-inf``/``inf`` for ``real``).

    Raises:
        ValueError: an unknown ``kind``, or, for ``"interval"``/``"circle"``, bounds
            that are not finite with ``low < high``.
    """

    kind: str
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self):
        if self.kind not in ("real", "interval", "circle"):
            raise ValueError(f"unknown domain kind {self.kind!r}")
        if self.kind != "real" and not (math.isfinite(self.low) and math.isfinite(self.high)
                                        and self.low < self.high):
            raise ValueError(f"{self.kind} domain needs finite low < high, "
                             f"got [{self.low}, {self.high}]")

    @property
    def code(self) -> int:
        """Integer code of :attr:`kind` used in :class:`DomainSpec` buffers: 0 real, 1
        interval, 2 circle."""
        return {"real": REAL, "interval": INTERVAL, "circle": CIRCLE}[self.kind]


real = Domain("real")
"""The real line (a spline on it has linear tails outside ``[-tail_bound, tail_bound]``)."""


def interval(low: float, high: float) -> Domain:
    """The closed interval ``[low, high]`` (bounds in the data's units).

    Returns:
        ``Domain("interval", low, high)``.

    Raises:
        ValueError: ``low >= high`` or a bound is not finite.
    """
    return Domain("interval", float(low), float(high))


circle = Domain("circle", -math.pi, math.pi)
"""Angles in radians on ``[-pi, pi)``; ``-pi`` and ``pi`` are the same point."""

DomainLike = Union[Domain, str]


def _one(d: DomainLike) -> Domain:
    if isinstance(d, Domain):
        return d
    if d == "real":
        return real
    if d == "circle":
        return circle
    raise ValueError(f"unknown domain {d!r}: use normflux.real, normflux.circle or "
                     "normflux.interval(a, b)")


def as_domains(domains: DomainLike | Sequence[DomainLike] | None, features: int) -> tuple[Domain, ...]:
    """Expand ``domains`` into one :class:`Domain` per coordinate.

    Arguments:
        domains: ``None`` (all real), one domain for every coordinate, or a sequence of
            ``features`` domains.
        features: the number of coordinates.

    Returns:
        a tuple of ``features`` :class:`Domain` objects (the strings ``"real"`` and
        ``"circle"`` become :data:`real` and :data:`circle`).

    Raises:
        ValueError: a sequence of the wrong length, or an unknown domain name.
    """
    if domains is None:
        return (real,) * features
    if isinstance(domains, (Domain, str)):
        return (_one(domains),) * features
    domains = tuple(_one(d) for d in domains)
    if len(domains) != features:
        raise ValueError(f"got {len(domains)} domains for {features} features")
    return domains


class DomainSpec(ConstantsMixin):
    """Per-coordinate domain tensors for ``n`` coordinates (buffers: they follow ``.to()``).

    Buffers:
        kind: ``(n,)`` long, 0 real, 1 interval, 2 circle.
        low, high: ``(n,)`` bounds; for real coordinates ``(-tail_bound, tail_bound)``
            where a bijection supplies a bound, else ``(-inf, inf)``.

    Arguments:
        domains: a sequence of :class:`Domain`.
        tail_bound: the bound ``B`` used for real coordinates (``None``: infinite).
    """

    def __init__(self, domains: Sequence[Domain], tail_bound: float | None = None):
        super().__init__()
        self.domains = tuple(domains)
        B = math.inf if tail_bound is None else float(tail_bound)
        low = [(-B if d.kind == "real" else d.low) for d in self.domains]
        high = [(B if d.kind == "real" else d.high) for d in self.domains]
        self.register_buffer("kind", torch.tensor([d.code for d in self.domains], dtype=torch.long),
                             persistent=False)
        self.register_constant("low", low)
        self.register_constant("high", high)
        self.any_circular = any(d.kind == "circle" for d in self.domains)
        self.all_real = all(d.kind == "real" for d in self.domains)
        circ = [i for i, d in enumerate(self.domains) if d.kind == "circle"]
        other = [i for i, d in enumerate(self.domains) if d.kind != "circle"]
        self.register_buffer("circ_idx", torch.tensor(circ, dtype=torch.long), persistent=False)
        self.register_buffer("other_idx", torch.tensor(other, dtype=torch.long), persistent=False)
        self.register_constant("circ_low", [self.domains[i].low for i in circ])
        self.register_constant("circ_scale", [2 * math.pi / (self.domains[i].high - self.domains[i].low)
                                              for i in circ])

    def __len__(self) -> int:
        return len(self.domains)

    def wrap(self, x: Tensor) -> Tensor:
        """Wrap circular coordinates (last axis) into ``[low, high)``; others unchanged.

        Arguments:
            x: ``(..., n)``, one column per coordinate of the spec.

        Returns:
            a tensor of ``x``'s shape (``x`` itself when no coordinate is circular).
        """
        if not self.any_circular:
            return x
        period = self.high - self.low
        wrapped = torch.remainder(x - self.low, torch.where(self.kind == CIRCLE, period, 1.0)) + self.low
        return torch.where(self.kind == CIRCLE, wrapped, x)

    def features(self, x: Tensor) -> Tensor:
        """Conditioner features: ``(cos, sin)`` of circular coordinates, others as they are.

        Arguments:
            x: ``(batch, n)``.

        Returns:
            ``(batch, n + number of circular coordinates)``.
        """
        if not self.any_circular:
            return x
        theta = (x.index_select(1, self.circ_idx) - self.circ_low) * self.circ_scale
        return torch.cat([x.index_select(1, self.other_idx), torch.cos(theta), torch.sin(theta)],
                         dim=1)

    def num_features(self) -> int:
        """Width of :meth:`features`' output."""
        return len(self.domains) + sum(d.kind == "circle" for d in self.domains)

    def extra_repr(self) -> str:
        return ", ".join(d.kind for d in self.domains)
