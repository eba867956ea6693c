"""Ready-made flows by name: ``build("nsf", features=2, domains=("real", "circle"))``.

:func:`build` turns a plain, JSON-serialisable set of arguments into a :class:`ModelFlow`
and stores those arguments on it as ``flow.config``; ``build(**flow.config)`` rebuilds
the same architecture (same permutations, same coupling domains), so that a checkpoint
needs only ``config`` and ``state_dict`` (:mod:`normflux.checkpoint`).

Architectures are a registry (:data:`MODELS`): adding one (``"maf"``, ``"iaf"``, ...) is
one entry, a function returning the chain of layers; see :func:`register`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from ._checks import flag, integer, real
from .distributions.base import BaseDistribution, CircularUniform, DiagGaussian, Product, Uniform
from .flows import Flow
from .transforms.autoregressive import MaskedAutoregressive
from .transforms.base import Chain, Inverse, Transform
from .transforms.bijections import Affine, RQSpline
from .transforms.coupling import Coupling
from .transforms.domains import Domain, as_domains, interval
from .transforms.linear import LULinear
from .transforms.permutations import CircularShift, Permutation
from .transforms.planar import Planar, Radial, Sylvester

__all__ = ["build", "register", "MODELS", "ModelFlow", "Standardize", "LayerSpec",
           "fit_standardization", "domains_to_config", "domains_from_config", "base_for",
           "mixing"]


# ---------------------------------------------------------------------------- domains
def domains_to_config(domains: Sequence[Domain]) -> list:
    """Domains as plain values: ``"real"``, ``"circle"`` or ``["interval", low, high]``.

    A circle with bounds other than ``[-pi, pi)`` is ``["circle", low, high]``.

    Returns:
        a JSON-serialisable list with one entry per domain (the inverse of
        :func:`domains_from_config`).
    """
    out: list = []
    for d in domains:
        if d.kind == "real":
            out.append("real")
        elif d.kind == "circle" and d.low == -math.pi and d.high == math.pi:
            out.append("circle")
        else:
            out.append([d.kind, d.low, d.high])
    return out


def domains_from_config(domains, features: int) -> tuple[Domain, ...]:
    """Inverse of :func:`domains_to_config`; also accepts :class:`Domain` objects.

    Arguments:
        domains: ``None`` (all real), one domain for all coordinates, or one per
            coordinate: a :class:`Domain`, ``"real"``, ``"circle"``,
            ``("interval", low, high)`` or ``("circle", low, high)``.
        features: ``D``.

    Returns:
        a tuple of ``features`` :class:`Domain` objects.

    Raises:
        ValueError: an unknown domain, bad bounds, or the wrong number of domains.
    """
    def one(d):
        if isinstance(d, (list, tuple)):
            if len(d) != 3 or d[0] not in ("interval", "circle"):
                raise ValueError(f"unknown domain {d!r}: use 'real', 'circle' or "
                                 "('interval', low, high)")
            return interval(d[1], d[2]) if d[0] == "interval" else Domain("circle", float(d[1]),
                                                                           float(d[2]))
        return d

    if domains is None or isinstance(domains, (Domain, str)):
        return as_domains(domains, features)
    return as_domains([one(d) for d in domains], features)


# ---------------------------------------------------------------------------- layers
class Standardize(Transform):
    """Fixed elementwise standardisation ``z = (x - mean) / std`` (no trainable parameters).

    The first layer of a model trained on data: it puts the data on the scale the spline
    tails (``[-tail_bound, tail_bound]``) and the conditioners expect, while
    ``log_prob`` stays on the data's own scale (``ladj = -sum(log std)``). ``mean`` and
    ``std`` are buffers, so they are saved in ``state_dict``; set them from training data
    with :meth:`set_stats` (or :func:`fit_standardization`). Only real coordinates are
    rescaled: for circle and interval coordinates ``mean = 0``, ``std = 1`` always, so the
    layer never moves a point out of its domain.

    Arguments:
        features: ``D``.
        domains: one domain per coordinate (default all real).

    Shapes:
        ``x``, ``z``: ``(batch, D)``; ``ladj``: ``(batch,)``, constant.

    Raises:
        ValueError: the wrong number of domains or an unknown domain name; at call time,
            a context (the layer is unconditional).
    """

    def __init__(self, features: int, domains: Sequence[Domain] | None = None):
        super().__init__()
        domains = as_domains(domains, features)
        self.register_buffer("mean", torch.zeros(features))
        self.register_buffer("std", torch.ones(features))
        self.register_buffer("is_real", torch.tensor([d.kind == "real" for d in domains]),
                             persistent=False)

    def is_identity(self) -> bool:
        """Whether the layer is still the identity (``mean = 0``, ``std = 1``: no
        statistics set, or data that was already standardised)."""
        return bool((self.mean == 0).all()) and bool((self.std == 1).all())

    @torch.no_grad()
    def set_stats(self, data: Tensor, eps: float = 1e-6) -> "Standardize":
        """Set ``mean``/``std`` from ``data`` ``(N, D)`` (real coordinates only; std >= eps).

        ``std`` is the unbiased (``N - 1``) sample standard deviation, floored at ``eps``.

        Returns:
            ``self``.

        Raises:
            ValueError: ``data`` is not ``(N, D)`` with ``N >= 2`` or contains NaN/Inf.
        """
        data = torch.as_tensor(data)
        D = self.mean.numel()
        if data.dim() != 2 or data.shape[1] != D or data.shape[0] < 2:
            raise ValueError(f"standardisation needs data of shape (N >= 2, {D}), "
                             f"got {tuple(data.shape)}")
        data = data.to(self.mean.dtype)
        if not bool(torch.isfinite(data).all()):
            raise ValueError("standardisation data contains NaN or Inf")
        mean = data.mean(0)
        std = data.std(0).clamp_min(eps)
        self.mean.copy_(torch.where(self.is_real, mean, torch.zeros_like(mean)))
        self.std.copy_(torch.where(self.is_real, std, torch.ones_like(std)))
        return self

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        ladj = -torch.log(self.std).sum()
        return (x - self.mean) / self.std, ladj.expand(x.shape[0]).to(x.dtype)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        ladj = torch.log(self.std).sum()
        return z * self.std + self.mean, ladj.expand(z.shape[0]).to(z.dtype)


class ModelFlow(Flow):
    """A :class:`~normflux.flows.Flow` built by :func:`build`, carrying its ``config``.

    Besides the ``config`` dict (the keyword arguments of :func:`build`), a conditional
    model standardises its context with fixed buffers ``context_mean``/``context_std``
    (identity until set by :func:`fit_standardization`), so that callers always pass the
    context on its own scale, as it is in the data. Everything else is :class:`Flow`.

    Arguments:
        transform, base: as for :class:`~normflux.flows.Flow`.
        config: the keyword arguments of :func:`build` (deep-copied).
        context_features: ``C`` or ``None``.

    Shapes:
        as :class:`~normflux.flows.Flow`: ``log_prob(x (*batch, D), context (*batch, C))
        -> (*batch,)``; ``context_mean``, ``context_std``: ``(C,)``.

    Raises:
        ValueError, TypeError: as :class:`~normflux.flows.Flow`.
    """

    def __init__(self, transform: Transform, base: BaseDistribution, config: dict,
                 context_features: int | None = None):
        super().__init__(transform, base, context_features)
        self.config = copy.deepcopy(config)
        if self.context_features is not None:
            self.register_buffer("context_mean", torch.zeros(self.context_features))
            self.register_buffer("context_std", torch.ones(self.context_features))

    def _prepare_context(self, context, batch):
        context = super()._prepare_context(context, batch)
        if context is None:
            return None
        return (context - self.context_mean.to(context.dtype)) / self.context_std.to(context.dtype)

    def standardizer(self) -> Standardize | None:
        """The :class:`Standardize` layer (first in the chain), or ``None``."""
        t = self.transform
        if isinstance(t, Chain) and len(t) and isinstance(t[0], Standardize):
            return t[0]
        return None


@torch.no_grad()
def fit_standardization(flow: ModelFlow, data: Tensor, context: Tensor | None = None) -> None:
    """Set a model's fixed standardisation from training data.

    Arguments:
        flow: a :class:`ModelFlow` (built with ``standardize=True`` for the data part).
        data: ``(N, D)`` training data (dequantised if the model sees dequantised data).
        context: ``(N, C)`` training contexts for a conditional model, or ``None``.

    The context statistics are the per-column mean and unbiased standard deviation
    (floored at 1e-6; 1 for a single row). Without ``context``, the context
    standardisation of a conditional model is left unchanged.

    Raises:
        ValueError: the model has no :class:`Standardize` layer, ``data`` is not
            ``(N >= 2, D)`` or is not finite, a context for an unconditional model, or a
            context that is not ``(N, C)``.
    """
    layer = flow.standardizer()
    if layer is None:
        raise ValueError("the model was built with standardize=False; rebuild it with "
                         "standardize=True to standardise its inputs")
    layer.set_stats(data)
    if context is not None:
        if flow.context_features is None:
            raise ValueError("the model is unconditional but a context was given")
        context = torch.as_tensor(context).to(flow.context_mean.dtype)
        if context.dim() != 2 or context.shape[1] != flow.context_features:
            raise ValueError(f"context must have shape (N, {flow.context_features}), "
                             f"got {tuple(context.shape)}")
        flow.context_mean.copy_(context.mean(0))
        flow.context_std.copy_(context.std(0).clamp_min(1e-6) if context.shape[0] > 1
                               else torch.ones_like(flow.context_std))


# ---------------------------------------------------------------------------- registry
@dataclass
class LayerSpec:
    """What a registered architecture receives: everything :func:`build` was given.

    Attributes:
        features: ``D``.
        domains: one :class:`Domain` per coordinate, in the layer's input order.
        context: context width ``C`` or ``None``.
        layers: number of flow layers (couplings / autoregressive layers).
        hidden: hidden widths of each conditioner.
        bins, tail_bound: spline settings (for spline architectures).
        permutation: ``"random"``, ``"reverse"`` or ``"none"`` between layers (D > 2).
        generator: seeded random generator for permutations / random masks.
        options: any further keyword arguments of :func:`build`, for the architecture.
    """

    features: int
    domains: tuple[Domain, ...]
    context: int | None
    layers: int
    hidden: tuple[int, ...]
    bins: int
    tail_bound: float
    permutation: str
    generator: torch.Generator
    options: dict


#: name -> function(spec: LayerSpec) -> (list of transforms in the forward direction,
#: domains of the output coordinates). The base is built by :func:`build` from those
#: output domains. One entry per architecture.
MODELS: dict[str, Callable[[LayerSpec], tuple[list[Transform], tuple[Domain, ...]]]] = {}


def register(name: str):
    """Decorator adding an architecture to :data:`MODELS` under ``name``.

    The decorated function takes a :class:`LayerSpec` and returns ``(layers, domains)``:
    the transforms (data -> base order) and the domains of the coordinates they output
    (permutations reorder them). Unknown ``spec.options`` should raise ``ValueError``.
    """
    def deco(fn):
        MODELS[name] = fn
        return fn
    return deco


def mixing(spec: LayerSpec, domains: tuple[Domain, ...], last: bool) -> tuple[list[Transform],
                                                                            tuple[Domain, ...]]:
    """The fixed layers between two flow layers: a circular shift, then a permutation.

    ``CircularShift`` by ``pi`` when any coordinate is circular (so that the splines'
    fixed point moves; Rezende et al. 2020); for ``D > 2`` and ``spec.permutation`` other
    than ``"none"`` a ``Permutation`` (``"random"``: Kingma & Dhariwal 2018's shuffle,
    ``"reverse"``: Papamakarios et al. 2017), whose reordering of the domains is
    returned. Nothing after the last layer.

    Returns:
        ``(layers, domains)``: the fixed transforms and the domains of their output
        coordinates.

    Raises:
        ValueError: an unknown ``spec.permutation`` (only checked when a permutation is
            built).
    """
    if last:
        return [], domains
    out: list[Transform] = []
    if any(d.kind == "circle" for d in domains):
        out.append(CircularShift(domains))
    if spec.features > 2 and spec.permutation != "none":
        if spec.permutation == "random":
            p = Permutation.random(spec.features, generator=spec.generator)
        elif spec.permutation == "reverse":
            p = Permutation.reverse(spec.features)
        else:
            raise ValueError(f"permutation must be 'random', 'reverse' or 'none', "
                             f"got {spec.permutation!r}")
        out.append(p)
        domains = tuple(domains[i] for i in p.perm.tolist())
    return out, domains


def _no_options(name: str, spec: LayerSpec) -> None:
    if spec.options:
        raise ValueError(f"model {name!r} does not take the options {sorted(spec.options)}")


def _coupling_stack(name: str, spec: LayerSpec, make_bijection) -> tuple[list[Transform],
                                                                          tuple[Domain, ...]]:
    _no_options(name, spec)
    domains = spec.domains
    layers: list[Transform] = []
    # A reversal maps even positions to odd ones when D is even, so it already swaps the
    # halves: flipping the mask as well would transform the same coordinates every time.
    reversal_swaps = spec.permutation == "reverse" and spec.features > 2 and spec.features % 2 == 0
    for i in range(spec.layers):
        flip = i % 2 == 1 and not reversal_swaps
        layers.append(Coupling(make_bijection(), mask="alternating", flip=flip,
                               features=spec.features, domains=domains,
                               context_features=spec.context, hidden_features=spec.hidden))
        extra, domains = mixing(spec, domains, last=i == spec.layers - 1)
        layers += extra
    return layers, domains


@register("nsf")
def _nsf(spec: LayerSpec):
    """Neural spline flow, coupling version (Durkan et al. 2019, section 3.1): rational-
    quadratic spline couplings with alternating masks, on real, interval and circular
    coordinates (circular splines of Rezende et al. 2020)."""
    return _coupling_stack("nsf", spec, lambda: RQSpline(spec.bins, spec.tail_bound))


@register("realnvp")
def _realnvp(spec: LayerSpec):
    """Real NVP (Dinh et al. 2017): affine couplings with alternating masks. Real
    coordinates only."""
    bad = [d.kind for d in spec.domains if d.kind != "real"]
    if bad:
        raise ValueError(f"model 'realnvp' (affine coupling) supports real coordinates only, "
                         f"got {sorted(set(bad))}; use 'nsf' for circle/interval coordinates")
    return _coupling_stack("realnvp", spec, Affine)


def _autoregressive_stack(name: str, spec: LayerSpec, make_bijection, *, inverse: bool = False,
                          linear: bool = False) -> tuple[list[Transform], tuple[Domain, ...]]:
    """``layers`` masked autoregressive layers with the papers' mixing between them.

    Between layers: an ``LULinear`` layer when ``linear`` and every coordinate is real
    (Durkan et al. 2019, section 4: "an invertible linear transformation ... between
    layers"), otherwise :func:`mixing` (circular shift and permutation). ``inverse``
    wraps each layer in :class:`~normflux.transforms.Inverse` (IAF).
    """
    _no_options(name, spec)
    domains = spec.domains
    all_real = all(d.kind == "real" for d in domains)
    layers: list[Transform] = []
    for i in range(spec.layers):
        # alternate the autoregressive order, so that with D = 2 (no permutation) every
        # coordinate is also conditioned on the other
        t = MaskedAutoregressive(make_bijection(), features=spec.features, domains=domains,
                                 context_features=spec.context, hidden_features=spec.hidden,
                                 order="reversed" if i % 2 else "sequential")
        layers.append(Inverse(t) if inverse else t)
        last = i == spec.layers - 1
        if linear and all_real and not last:
            layers.append(LULinear(spec.features))
        else:
            extra, domains = mixing(spec, domains, last)
            layers += extra
    return layers, domains


def _real_only(name: str, spec: LayerSpec) -> None:
    bad = [d.kind for d in spec.domains if d.kind != "real"]
    if bad:
        raise ValueError(f"model {name!r} supports real coordinates only, got "
                         f"{sorted(set(bad))}; use 'nsf' or 'nsf-ar' for circle/interval "
                         "coordinates")


@register("maf")
def _maf(spec: LayerSpec):
    """Masked autoregressive flow (Papamakarios et al. 2017): affine MADE layers with a
    permutation between them (the paper reverses the order; ``permutation="reverse"``).
    Density in one pass per layer; sampling in ``D`` passes per layer."""
    _real_only("maf", spec)
    return _autoregressive_stack("maf", spec, Affine)


@register("iaf")
def _iaf(spec: LayerSpec):
    """Inverse autoregressive flow (Kingma et al. 2016): ``Inverse`` of MAF layers, so
    sampling is one pass per layer and density is ``D`` passes per layer (for variational
    inference, where samples come with their density)."""
    _real_only("iaf", spec)
    return _autoregressive_stack("iaf", spec, Affine, inverse=True)


@register("nsf-ar")
def _nsf_ar(spec: LayerSpec):
    """Neural spline flow, autoregressive version (Durkan et al. 2019, section 3.2), with
    an LU-linear layer between layers on real data; with circle or interval coordinates,
    the circular autoregressive spline of normflows' Figure 1 (Rezende et al. 2020) with a
    circular shift and permutation between layers."""
    return _autoregressive_stack("nsf-ar", spec, lambda: RQSpline(spec.bins, spec.tail_bound),
                                 linear=True)


def _stack_of(name: str, spec: LayerSpec, layer) -> tuple[list[Transform], tuple[Domain, ...]]:
    """``spec.layers`` copies of a whole-vector layer ``layer(features, context_features=...)``
    (no mixing between them); real coordinates only, no options."""
    _real_only(name, spec)
    _no_options(name, spec)
    return [layer(spec.features, context_features=spec.context) for _ in range(spec.layers)], \
        spec.domains


@register("planar")
def _planar(spec: LayerSpec):
    """Planar flow (Rezende & Mohamed 2015): ``layers`` planar maps (``hidden`` is unused);
    conditional on the context when ``context`` is given. Real coordinates only."""
    return _stack_of("planar", spec, Planar)


@register("radial")
def _radial(spec: LayerSpec):
    """Radial flow (Rezende & Mohamed 2015): ``layers`` radial maps. Real coordinates only."""
    return _stack_of("radial", spec, Radial)


@register("sylvester")
def _sylvester(spec: LayerSpec):
    """Householder Sylvester flow (van den Berg et al. 2018): ``layers`` Sylvester maps,
    each with ``D`` Householder reflections (option ``reflections``). Real coordinates
    only."""
    _real_only("sylvester", spec)
    opts = dict(spec.options)
    reflections = int(opts.pop("reflections", spec.features))
    if opts:
        raise ValueError(f"model 'sylvester' does not take the options {sorted(opts)}")
    return [Sylvester(spec.features, reflections=reflections, context_features=spec.context)
            for _ in range(spec.layers)], spec.domains


def base_for(domains: Sequence[Domain]) -> BaseDistribution:
    """The base distribution for coordinates with these domains.

    ``DiagGaussian`` (standard normal) for real, ``CircularUniform`` for circle
    (``[-pi, pi)``; for other circle bounds a ``Uniform`` on them) and ``Uniform`` for
    interval coordinates; a :class:`~normflux.distributions.Product` over runs of
    consecutive equal domains when they differ.

    Returns:
        an unconditional base with event shape ``(len(domains),)``.
    """
    parts: list[BaseDistribution] = []
    i = 0
    while i < len(domains):
        j = i
        while j < len(domains) and domains[j].kind == domains[i].kind and (
                domains[i].kind == "real" or domains[j] == domains[i]):
            j += 1
        d, n = domains[i], j - i
        if d.kind == "real":
            parts.append(DiagGaussian(n))
        elif d.kind == "circle" and d.low == -math.pi and d.high == math.pi:
            parts.append(CircularUniform(n))
        else:
            parts.append(Uniform(n, d.low, d.high))
        i = j
    return parts[0] if len(parts) == 1 else Product(parts)


def build(name: str, features: int, *, context: int | None = None, layers: int = 8,
          hidden: Sequence[int] | int = (64, 64), bins: int = 8, tail_bound: float = 3.0,
          domains=None, permutation: str = "random", standardize: bool = False,
          seed: int | None = 0, **options) -> ModelFlow:
    """Build a flow by architecture name.

    Arguments:
        name: a key of :data:`MODELS` (``"nsf"``, ``"realnvp"``, ...).
        features: data dimension ``D >= 2``.
        context: context width ``C`` for a conditional flow, or ``None``.
        layers: number of coupling (or autoregressive) layers, >= 1.
        hidden: hidden widths of each conditioner MLP (an int means two such layers).
        bins, tail_bound: RQ spline bins ``K`` and the box ``[-B, B]`` for real coordinates.
        domains: ``None`` (all real) or one per coordinate (``"real"``, ``"circle"``,
            ``("interval", a, b)`` or :class:`Domain`).
        permutation: between layers for ``D > 2``: ``"random"`` (seeded by ``seed``),
            ``"reverse"`` or ``"none"``.
        standardize: put a fixed :class:`Standardize` layer first (set it with
            :func:`fit_standardization`).
        seed: seeds the permutations and the initial weights, so that ``build(**config)``
            is deterministic; ``None`` draws one from torch's global generator (it is then
            stored in ``config``).
        options: architecture-specific options (rejected by architectures without any).

    Returns:
        a :class:`ModelFlow` with ``flow.config`` a plain dict such that
        ``build(**flow.config)`` rebuilds it.

    Raises:
        ValueError: an unknown ``name`` (the message lists the known names), ``D < 2``,
            ``layers < 1``, a non-positive ``context``, bad domains, an unknown
            ``permutation`` (detected when ``D > 2`` and ``layers > 1``), or settings and
            options the architecture rejects.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    features = integer("features", features)
    layers = integer("layers", layers)
    bins = integer("bins", bins, minimum=1)
    if context is not None:
        context = integer("context", context)
    if isinstance(hidden, str) or not isinstance(hidden, (int, Sequence)) or isinstance(hidden, bool):
        raise ValueError(f"hidden must be an int or a sequence of ints, got {hidden!r}")
    hidden = [integer("hidden", h, minimum=1)
              for h in ([hidden] * 2 if isinstance(hidden, int) else hidden)]
    if not hidden:
        raise ValueError("hidden needs at least one width, got an empty sequence")
    tail_bound = real("tail_bound", tail_bound, low=0, low_open=True)
    if permutation not in ("random", "reverse", "none"):
        raise ValueError(f"permutation must be 'random', 'reverse' or 'none', got {permutation!r}")
    flag("standardize", standardize)
    if features < 2:
        raise ValueError(f"flow models need at least 2 features, got {features}")
    if int(layers) < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if context is not None and int(context) < 1:
        raise ValueError(f"context must be None or a positive width, got {context}")
    hidden = (int(hidden),) * 2 if isinstance(hidden, int) else tuple(int(h) for h in hidden)
    doms = domains_from_config(domains, features)
    if seed is None:
        seed = int(torch.randint(2**31 - 1, ()).item())
    config = dict(name=name, features=features, context=None if context is None else int(context),
                  layers=int(layers), hidden=list(hidden), bins=int(bins),
                  tail_bound=float(tail_bound),
                  domains=None if all(d.kind == "real" for d in doms) else domains_to_config(doms),
                  permutation=permutation, standardize=bool(standardize), seed=int(seed),
                  **options)
    spec = LayerSpec(features, doms, config["context"], config["layers"], hidden, config["bins"],
                     config["tail_bound"], permutation, torch.Generator().manual_seed(int(seed)),
                     dict(options))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        body, out_domains = MODELS[name](spec)
    if standardize:
        body = [Standardize(features, doms)] + list(body)
    return ModelFlow(Chain(body), base_for(out_domains), config, config["context"])
