"""Builders shared by the core tests: the transform registry, parameter jitter, inputs.

Every transform class of ``normflux.transforms`` is registered once in :data:`LAYERS`
with a small constructor; the harness test (``test_transforms.py``) and the case tests
(C02, C03, C11, C14, ...) iterate over it, so that a new layer registered here is
checked everywhere. Adding an autoregressive spline layer to the spline cases is one
line in :data:`SPLINE_LAYERS`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from normflux.transforms import (
    ActNorm,
    Additive,
    Affine,
    BatchNorm,
    Chain,
    CircularShift,
    Coupling,
    Domain,
    Inverse,
    LULinear,
    MaskedAutoregressive,
    Permutation,
    Planar,
    Radial,
    RQSpline,
    Sylvester,
    Transform,
    as_domains,
    circle,
    interval,
    real,
)

CTX = 4  # context width of every conditional layer in the registry


@dataclass(frozen=True)
class LayerSpec:
    """A registered transform: ``build(g)`` returns a fresh instance (float32, at init).

    Attributes:
        name: test id.
        build: constructor taking a ``torch.Generator`` (random masks and permutations).
        domains: the domain of each input coordinate (inputs are drawn inside it).
        context: context width, or ``None``.
        spline: whether the layer contains a spline (used by the spline cases).
    """

    name: str
    build: Callable[[torch.Generator], Transform]
    domains: tuple[Domain, ...]
    context: int | None = None
    spline: bool = False

    @property
    def features(self) -> int:
        return len(self.domains)


H = (16, 16)  # small conditioners: fast, and the Jacobian checks stay cheap
MIXED = (real, circle, interval(-1.0, 2.0), circle, real, interval(0.0, 1.0))


def _spec(name, build, domains, context=None, spline=False):
    return LayerSpec(name, build, tuple(as_domains(domains, len(domains))), context, spline)


LAYERS: list[LayerSpec] = [
    # Coupling x {Affine, Additive, RQSpline} x {alternating, half, random, explicit} x ctx
    _spec("affine-alternating",
          lambda g: Coupling(Affine(), mask="alternating", features=4, hidden_features=H),
          [real] * 4),
    _spec("affine-half-ctx",
          lambda g: Coupling(Affine(), mask="half", features=5, context_features=CTX,
                             hidden_features=H), [real] * 5, CTX),
    _spec("affine-random-bound",
          lambda g: Coupling(Affine(log_scale_bound=0.7), mask="random", features=5,
                             generator=g, hidden_features=H), [real] * 5),
    _spec("additive-random",
          lambda g: Coupling(Additive(), mask="random", features=5, generator=g,
                             hidden_features=H), [real] * 5),
    _spec("additive-explicit-ctx",
          lambda g: Coupling(Additive(), mask=[True, False, False, True], context_features=CTX,
                             hidden_features=H), [real] * 4, CTX),
    _spec("rqs-alternating",
          lambda g: Coupling(RQSpline(8), mask="alternating", features=4, hidden_features=H),
          [real] * 4, spline=True),
    _spec("rqs-half-flip",
          lambda g: Coupling(RQSpline(4, tail_bound=2.0), mask="half", features=3, flip=True,
                             hidden_features=H), [real] * 3, spline=True),
    _spec("rqs-random-ctx",
          lambda g: Coupling(RQSpline(6), mask="random", features=5, generator=g,
                             context_features=CTX, hidden_features=H), [real] * 5, CTX, True),
    _spec("rqs-explicit",
          lambda g: Coupling(RQSpline(5, tail_bound=2.5), mask=[True, True, False, True, False],
                             hidden_features=H), [real] * 5, spline=True),
    # mixed domains: real + circle + interval in one layer, conditioned on real + circle
    _spec("rqs-mixed",
          lambda g: Coupling(RQSpline(8), mask=[False, True, True, False, True, True],
                             domains=MIXED, hidden_features=H), MIXED, spline=True),
    _spec("rqs-mixed-ctx",
          lambda g: Coupling(RQSpline(7), mask=[True, False, True, True, False, True],
                             domains=MIXED, context_features=CTX, hidden_features=H),
          MIXED, CTX, True),
    _spec("rqs-circle",
          lambda g: Coupling(RQSpline(8), mask="alternating", features=2, domains=circle,
                             hidden_features=H), [circle] * 2, spline=True),
    _spec("rqs-interval",
          lambda g: Coupling(RQSpline(6), mask="alternating", features=3,
                             domains=interval(-2.0, 3.0), hidden_features=H),
          [interval(-2.0, 3.0)] * 3, spline=True),
    # permutations and shifts
    _spec("permutation-reverse", lambda g: Permutation.reverse(5), [real] * 5),
    _spec("permutation-random", lambda g: Permutation.random(6, generator=g), [real] * 6),
    _spec("circular-shift",
          lambda g: CircularShift([circle, real, circle, interval(0.0, 1.0)], shift=1.3),
          [circle, real, circle, interval(0.0, 1.0)]),
    # composition
    _spec("chain",
          lambda g: Chain([Coupling(RQSpline(8), mask="alternating", features=4, hidden_features=H),
                           Permutation.random(4, generator=g),
                           Coupling(Affine(), mask="half", features=4, hidden_features=H),
                           Permutation.reverse(4),
                           Coupling(Additive(), mask="random", features=4, generator=g,
                                    hidden_features=H)]),
          [real] * 4, spline=True),
    _spec("chain-ctx",
          lambda g: Chain([Coupling(RQSpline(8), mask="alternating", features=4,
                                    context_features=CTX, hidden_features=H),
                           Permutation.reverse(4),
                           Coupling(Affine(), mask="half", features=4, hidden_features=H),
                           Coupling(RQSpline(4), mask="random", features=4, generator=g,
                                    context_features=CTX, hidden_features=H)]),
          [real] * 4, CTX, True),
    _spec("chain-torus",
          lambda g: Chain([Coupling(RQSpline(8), mask=[False, True], domains=circle,
                                    hidden_features=H),
                           CircularShift([circle, circle], shift=2.0),
                           Coupling(RQSpline(8), mask=[True, False], domains=circle,
                                    hidden_features=H)]),
          [circle] * 2, spline=True),
    # inverses
    _spec("inverse-rqs",
          lambda g: Inverse(Coupling(RQSpline(8), mask="alternating", features=4,
                                     hidden_features=H)), [real] * 4, spline=True),
    _spec("inverse-affine-ctx",
          lambda g: Inverse(Coupling(Affine(), mask="half", features=4, context_features=CTX,
                                     hidden_features=H)), [real] * 4, CTX),
    _spec("inverse-mixed-ctx",
          lambda g: Inverse(Coupling(RQSpline(8), mask=[False, True, True, False, True, True],
                                     domains=MIXED, context_features=CTX, hidden_features=H)),
          MIXED, CTX, True),
]



def _actnorm(features: int) -> ActNorm:
    """ActNorm after its data-dependent initialisation (on a fixed, non-standard batch)."""
    a = ActNorm(features)
    g = torch.Generator().manual_seed(11)
    a.initialize(2.0 + 3.0 * torch.randn(64, features, generator=g))
    return a


def _batchnorm(features: int) -> BatchNorm:
    """BatchNorm with non-trivial running statistics (it is an exact bijection in eval)."""
    b = BatchNorm(features)
    g = torch.Generator().manual_seed(12)
    b.running_mean.copy_(torch.randn(features, generator=g))
    b.running_var.copy_(0.5 + torch.rand(features, generator=g))
    return b


LAYERS += [
    # autoregressive: MAF, AR-NSF (real, mixed domains, conditional), IAF
    _spec("maf-affine",
          lambda g: MaskedAutoregressive(Affine(), features=4, hidden_features=H), [real] * 4),
    _spec("ar-rqs-random-order-ctx",
          lambda g: MaskedAutoregressive(RQSpline(6), features=4, context_features=CTX,
                                         order="random", generator=g, hidden_features=H),
          [real] * 4, CTX, True),
    _spec("ar-rqs-mixed",
          lambda g: MaskedAutoregressive(RQSpline(8), features=6, domains=MIXED,
                                         hidden_features=H), MIXED, spline=True),
    _spec("iaf-ctx",
          lambda g: Inverse(MaskedAutoregressive(Affine(), features=4, context_features=CTX,
                                                 hidden_features=H)), [real] * 4, CTX),
    # linear and normalisation
    _spec("lu-linear", lambda g: LULinear(5, permutation=torch.randperm(5, generator=g)),
          [real] * 5),
    _spec("actnorm", lambda g: _actnorm(4), [real] * 4),
    _spec("batchnorm-eval", lambda g: _batchnorm(4), [real] * 4),
    # planar family (forward by root finding)
    _spec("planar-ctx", lambda g: Planar(3, context_features=CTX), [real] * 3, CTX),
    _spec("radial", lambda g: Radial(3), [real] * 3),
    _spec("sylvester-orthogonal-ctx", lambda g: Sylvester(3, rank=2, context_features=CTX),
          [real] * 3, CTX),
    _spec("sylvester-householder", lambda g: Sylvester(3, reflections=2), [real] * 3),
]

LAYER_BY_NAME = {s.name: s for s in LAYERS}

#: registry names with a spline, that take (batch, D) real inputs (the C02 tail cases)
SPLINE_LAYERS = [s.name for s in LAYERS if s.spline and all(d.kind == "real" for d in s.domains)]
#: registry names with a context (C11, C12)
CONDITIONAL_LAYERS = [s.name for s in LAYERS if s.context is not None]


def randn_like_gen(p: Tensor, g: torch.Generator) -> Tensor:
    return torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype)


@torch.no_grad()
def jitter_(module: torch.nn.Module, std: float, g: torch.Generator) -> torch.nn.Module:
    """Add ``std * N(0, 1)`` to every parameter (a random, non-identity layer)."""
    for p in module.parameters():
        p.add_(std * randn_like_gen(p, g))
    return module


@torch.no_grad()
def sharpen_(module: torch.nn.Module, g: torch.Generator, bias_std: float = 20.0,
             weight_std: float = 1e-2) -> torch.nn.Module:
    """Sharp splines: every coupling conditioner's last layer gets bias ~ N(0, bias_std^2)
    and weights ~ N(0, weight_std^2): unnormalised spline parameters of scale ``bias_std``."""
    for m in module.modules():
        if isinstance(m, Coupling):
            weight, bias = m.conditioner.linear_parameters()[-1]
            weight.copy_(weight_std * randn_like_gen(weight, g))
            bias.copy_(bias_std * randn_like_gen(bias, g))
    return module


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with the global RNG seeded (layers draw their initial weights from it),
    restoring the outer RNG state afterwards: builders do not depend on test order."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def build(name: str, *, seed: int = 0, jitter: float = 0.3, sharp: bool = False,
          dtype: torch.dtype = torch.float64) -> Transform:
    """A registered layer with random (non-identity) parameters, in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        t = LAYER_BY_NAME[name].build(g)
    jitter_(t, jitter, g)
    if sharp:
        sharpen_(t, g)
    return t.to(dtype).eval()


def sample_domain(domains: Sequence[Domain], n: int, g: torch.Generator,
                  dtype: torch.dtype = torch.float64, real_scale: float = 1.5) -> Tensor:
    """``n`` points inside the domains: real ~ N(0, real_scale^2) (some beyond the usual
    tail bound 3), interval ~ U(low, high) strictly inside, circle ~ U[-pi, pi)."""
    cols = []
    for d in domains:
        if d.kind == "real":
            c = real_scale * torch.randn(n, generator=g, dtype=torch.float64)
        else:
            u = torch.rand(n, generator=g, dtype=torch.float64)
            if d.kind == "interval":
                u = 0.005 + 0.99 * u
            c = d.low + (d.high - d.low) * u
        cols.append(c)
    return torch.stack(cols, dim=1).to(dtype)


def inputs(spec: LayerSpec, n: int = 8, seed: int = 1,
           dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor | None]:
    """``(x, context)`` for a registered layer: ``x`` in its support, ``context ~ N(0, I)``."""
    g = torch.Generator().manual_seed(seed)
    x = sample_domain(spec.domains, n, g, dtype)
    ctx = None if spec.context is None else torch.randn(n, spec.context, generator=g,
                                                        dtype=torch.float64).to(dtype)
    return x, ctx


def jacobian_logdet(fn: Callable[[Tensor, Tensor | None], Tensor], x: Tensor,
                    context: Tensor | None = None) -> Tensor:
    """``log|det d fn(x_i)/d x_i|`` per row by autograd (an independent reference)."""
    out = []
    for i in range(x.shape[0]):
        ci = None if context is None else context[i:i + 1]
        J = torch.autograd.functional.jacobian(lambda v: fn(v[None], ci)[0][0], x[i])
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def wrap_angle(t: Tensor) -> Tensor:
    """Angle difference folded into ``[-pi, pi)`` (for comparisons mod 2 pi)."""
    return torch.remainder(t + math.pi, 2 * math.pi) - math.pi


def circular_distance(a: Tensor, b: Tensor) -> Tensor:
    return wrap_angle(a - b).abs()
