"""Peer-library model builders for the speed suite (``benchmarks/suite.py``).

Every builder returns a :class:`Handle`: the module (for parameters and Adam), a
``log_prob(x)`` callable and a ``sample(n)`` callable, so that the suite times every
library through the same closure. The architectures are those of the normflux models in
``suite.py`` (same widths, same number of layers, same parameter count); where a peer
cannot express a piece exactly, the closest equivalent is used and the difference is
listed in :data:`NOTES` (printed by the suite and written to ``results.md``).

Kinds (the ``kind`` argument of :func:`build`):

* ``"coupling_spline"``: RQ-spline coupling (NSF-C), linear tails, alternating masks;
  conditioner MLP ``n_A -> hidden -> n_B * (3K - 1)``.
* ``"maf_affine"``: MAF, MADE ``D -> hidden -> 2D``, reverse permutations between layers.
* ``"maf_spline"``: autoregressive RQ spline, MADE ``D -> hidden -> D (3K - 1)``.
* ``"realnvp"``: affine coupling, MLP ``n_A -> hidden -> 2 n_B``, alternating masks.

Adding a kind for a new figure (B5: Glow, residual flows): write ``_<lib>_<kind>``
functions below and add them to :data:`BUILDERS`; a library without a builder for a
kind is reported as "n/a" by the suite.

Orientation: normflux, nflows and zuko use the density direction as ``forward``;
normflows uses the sampling direction, so its layers are wrapped (as normflows' own
``CoupledRationalQuadraticSpline`` does) so that density is the one-pass direction.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

__all__ = ["Handle", "PlainMLP", "BUILDERS", "NOTES", "LIBRARIES", "available", "build"]

LIBRARIES = ("normflows", "nflows", "zuko")


@dataclass
class Handle:
    """One model of one library, as the suite needs it."""

    name: str
    module: nn.Module
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int], Tensor]


class PlainMLP(nn.Sequential):
    """``Linear -> ReLU -> ... -> Linear``, taking (and ignoring) an optional context.

    The conditioner used for the nflows and normflows couplings (zuko builds the same
    network itself). ``hidden_features`` is set so that nflows / normflows take their
    standard code path (they scale the width/height logits by ``1/sqrt(hidden)`` when the
    net has this attribute, as their own ``ResidualNet`` does, and warn otherwise).
    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], out_features))
        super().__init__(*layers)
        self.hidden_features = hidden[-1]

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:  # noqa: D102
        return super().forward(x)


def _alt_mask(features: int, i: int) -> Tensor:
    """Transformed coordinates of layer ``i`` (as normflux ``mask="alternating"``,
    ``flip=(i % 2 == 1)``): odd coordinates on even layers, even ones on odd layers."""
    odd = torch.arange(features) % 2 == 1
    return ~odd if i % 2 == 1 else odd


def available(lib: str) -> str | None:
    """``None`` when ``lib`` imports, else the reason it does not."""
    try:
        importlib.import_module(lib)
    except Exception as e:  # pragma: no cover - depends on the environment
        return f"{type(e).__name__}: {e}"
    return None


# ---------------------------------------------------------------------------- normflows
def _nf_wrappers():
    import normflows as nf

    class Flip(nf.flows.Flow):
        """A density-direction layer as a normflows (sampling-direction) flow."""

        def __init__(self, layer):
            super().__init__()
            self.layer = layer

        def forward(self, z, context=None):
            x, ld = self.layer.inverse(z, context)
            return x, ld.view(-1)

        def inverse(self, x, context=None):
            z, ld = self.layer(x, context)
            return z, ld.view(-1)

    def reverse_perm(features: int):
        p = nf.flows.Permute(features, mode="shuffle")
        p.perm = torch.arange(features - 1, -1, -1)
        p.inv_perm = torch.arange(features - 1, -1, -1)
        return p

    return nf, Flip, reverse_perm


def _nf_handle(name: str, layers_density_order: list, features: int) -> Handle:
    import normflows as nf
    # normflows applies ``flows`` in the sampling direction: reverse the density order
    model = nf.NormalizingFlow(nf.distributions.DiagGaussian(features, trainable=False),
                               list(reversed(layers_density_order)))
    return Handle(name, model, model.log_prob, lambda n: model.sample(n)[0])


def _normflows_coupling_spline(features, layers, hidden, bins, tail_bound):
    from normflows.flows.neural_spline.coupling import PiecewiseRationalQuadraticCoupling
    nf, Flip, _ = _nf_wrappers()
    mods = []
    for i in range(layers):
        c = PiecewiseRationalQuadraticCoupling(
            mask=_alt_mask(features, i).int(),
            transform_net_create_fn=lambda n_in, n_out: PlainMLP(n_in, hidden, n_out),
            num_bins=bins, tails="linear", tail_bound=tail_bound,
            apply_unconditional_transform=False)
        mods.append(Flip(c))
    return _nf_handle("normflows", mods, features)


def _normflows_maf(features, layers, hidden, make_layer):
    """``layers`` normflows autoregressive layers (``make_layer(features, hidden, blocks)``),
    density-forward, with reverse permutations between them."""
    nf, Flip, reverse_perm = _nf_wrappers()
    assert len(set(hidden)) == 1
    mods = []
    for i in range(layers):
        if i:
            mods.append(reverse_perm(features))
        mods.append(Flip(make_layer(features, hidden[0], len(hidden) - 1)))
    return _nf_handle("normflows", mods, features)


def _normflows_maf_affine(features, layers, hidden):
    from normflows.flows.affine.autoregressive import MaskedAffineAutoregressive
    return _normflows_maf(features, layers, hidden, lambda d, h, blocks: MaskedAffineAutoregressive(
        d, h, num_blocks=blocks, use_residual_blocks=False))


def _normflows_maf_spline(features, layers, hidden, bins, tail_bound):
    from normflows.flows.neural_spline.autoregressive import (
        MaskedPiecewiseRationalQuadraticAutoregressive,
    )
    return _normflows_maf(features, layers, hidden, lambda d, h, blocks: (
        MaskedPiecewiseRationalQuadraticAutoregressive(
            d, h, num_bins=bins, tails="linear", tail_bound=tail_bound, num_blocks=blocks,
            use_residual_blocks=False)))


def _normflows_realnvp(features, layers, hidden):
    import normflows as nf
    assert features == 2, "normflows' channel split + swap equals alternating masks for D=2"
    mods = []
    # density order: layer 0 transforms coordinate 1 given 0 (as normflux / nflows / zuko)
    for i in range(layers):
        if i:
            mods.append(nf.flows.Permute(2, mode="swap"))
        mods.append(nf.flows.AffineCouplingBlock(PlainMLP(1, hidden, 2), scale=True,
                                                 scale_map="exp", split_mode="channel"))
    return _nf_handle("normflows", mods, features)


# ---------------------------------------------------------------------------- nflows
def _nflows_handle(transforms: list, features: int) -> Handle:
    from nflows.distributions.normal import StandardNormal
    from nflows.flows.base import Flow
    from nflows.transforms import CompositeTransform
    model = Flow(CompositeTransform(transforms), StandardNormal([features]))
    return Handle("nflows", model, model.log_prob, model.sample)


def _nflows_coupling_spline(features, layers, hidden, bins, tail_bound):
    from nflows.transforms import PiecewiseRationalQuadraticCouplingTransform
    ts = [PiecewiseRationalQuadraticCouplingTransform(
        mask=_alt_mask(features, i).int(),
        transform_net_create_fn=lambda n_in, n_out: PlainMLP(n_in, hidden, n_out),
        num_bins=bins, tails="linear", tail_bound=tail_bound,
        apply_unconditional_transform=False) for i in range(layers)]
    return _nflows_handle(ts, features)


def _nflows_maf_affine(features, layers, hidden):
    from nflows.transforms import MaskedAffineAutoregressiveTransform, ReversePermutation
    assert len(set(hidden)) == 1
    ts = []
    for i in range(layers):
        if i:
            ts.append(ReversePermutation(features))
        ts.append(MaskedAffineAutoregressiveTransform(
            features, hidden[0], num_blocks=len(hidden) - 1, use_residual_blocks=False))
    return _nflows_handle(ts, features)


def _nflows_maf_spline(features, layers, hidden, bins, tail_bound):
    from nflows.transforms import (
        MaskedPiecewiseRationalQuadraticAutoregressiveTransform,
        ReversePermutation,
    )
    assert len(set(hidden)) == 1
    ts = []
    for i in range(layers):
        if i:
            ts.append(ReversePermutation(features))
        ts.append(MaskedPiecewiseRationalQuadraticAutoregressiveTransform(
            features, hidden[0], num_bins=bins, tails="linear", tail_bound=tail_bound,
            num_blocks=len(hidden) - 1, use_residual_blocks=False))
    return _nflows_handle(ts, features)


def _nflows_realnvp(features, layers, hidden):
    from nflows.transforms import AffineCouplingTransform
    ts = [AffineCouplingTransform(
        mask=_alt_mask(features, i).int(),
        transform_net_create_fn=lambda n_in, n_out: PlainMLP(n_in, hidden, n_out))
        for i in range(layers)]
    return _nflows_handle(ts, features)


# ---------------------------------------------------------------------------- zuko
def _zuko_handle(flow: nn.Module) -> Handle:
    return Handle("zuko", flow, lambda x: flow().log_prob(x),
                  lambda n: flow().sample((n,)))


def _zuko_base(features: int):
    from zuko.distributions import DiagNormal
    from zuko.lazy import UnconditionalDistribution
    return UnconditionalDistribution(DiagNormal, loc=torch.zeros(features),
                                     scale=torch.ones(features), buffer=True)


def _zuko_coupling_spline(features, layers, hidden, bins, tail_bound):
    from zuko.flows.coupling import GeneralCouplingTransform
    from zuko.lazy import Flow
    from zuko.transforms import MonotonicRQSTransform
    uni = partial(MonotonicRQSTransform, bound=tail_bound)
    # zuko's mask marks the *conditioning* coordinates
    ts = [GeneralCouplingTransform(features, mask=~_alt_mask(features, i), univariate=uni,
                                   shapes=[(bins,), (bins,), (bins - 1,)],
                                   hidden_features=tuple(hidden)) for i in range(layers)]
    return _zuko_handle(Flow(ts, _zuko_base(features)))


def _zuko_maf_affine(features, layers, hidden):
    import zuko
    # zuko alternates ascending / descending orders instead of permuting (equivalent)
    return _zuko_handle(zuko.flows.MAF(features, transforms=layers,
                                       hidden_features=tuple(hidden)))


def _zuko_maf_spline(features, layers, hidden, bins, tail_bound):
    import zuko
    from zuko.transforms import MonotonicRQSTransform
    return _zuko_handle(zuko.flows.MAF(
        features, transforms=layers, hidden_features=tuple(hidden),
        univariate=partial(MonotonicRQSTransform, bound=tail_bound),
        shapes=[(bins,), (bins,), (bins - 1,)]))


def _zuko_realnvp(features, layers, hidden):
    import zuko
    return _zuko_handle(zuko.flows.NICE(features, transforms=layers,
                                        hidden_features=tuple(hidden)))


BUILDERS: dict[str, dict[str, Callable[..., Handle]]] = {
    "normflows": {"coupling_spline": _normflows_coupling_spline,
                  "maf_affine": _normflows_maf_affine,
                  "maf_spline": _normflows_maf_spline,
                  "realnvp": _normflows_realnvp},
    "nflows": {"coupling_spline": _nflows_coupling_spline,
               "maf_affine": _nflows_maf_affine,
               "maf_spline": _nflows_maf_spline,
               "realnvp": _nflows_realnvp},
    "zuko": {"coupling_spline": _zuko_coupling_spline,
             "maf_affine": _zuko_maf_affine,
             "maf_spline": _zuko_maf_spline,
             "realnvp": _zuko_realnvp},
}

#: how each peer model differs from the normflux one (architecture kept identical)
NOTES: dict[str, list[str]] = {
    "normflows": [
        "coupling_spline: normflows' CoupledRationalQuadraticSpline hard-codes a ResidualNet "
        "and an extra unconditional spline on the identity half, so its underlying "
        "PiecewiseRationalQuadraticCoupling is used with a plain MLP and "
        "apply_unconditional_transform=False (layers wrapped density-forward, as the "
        "normflows wrapper does).",
        "maf_affine / maf_spline: MaskedAffineAutoregressive / "
        "MaskedPiecewiseRationalQuadraticAutoregressive with num_blocks=1 and feed-forward "
        "(not residual) blocks, wrapped so that density is the one-pass direction (MAF); "
        "normflows' MADE applies no activation after its first layer in this mode "
        "(same parameter count, one ReLU fewer). Reverse permutations are Permute "
        "layers with the reversal as their permutation.",
        "realnvp: AffineCouplingBlock (channel split, exp scale) with Permute('swap') "
        "between layers, which for D=2 is the alternating mask.",
    ],
    "nflows": [
        "coupling / realnvp conditioners are a plain Linear/ReLU MLP (nflows' own MLP "
        "takes no context argument); MADE with num_blocks=1, feed-forward blocks.",
    ],
    "zuko": [
        "coupling_spline: GeneralCouplingTransform with MonotonicRQSTransform(bound=3) "
        "(linear tails, K-1 interior slopes: the same spline parameterisation size); "
        "maf_*: zuko.flows.MAF alternates ascending/descending MADE orders instead of "
        "explicit reverse permutations (equivalent).",
    ],
}


def build(lib: str, kind: str, **arch) -> Handle:
    """Build the ``kind`` model of library ``lib`` with architecture ``arch``.

    Raises:
        KeyError: ``lib`` has no builder for ``kind``.
    """
    return BUILDERS[lib][kind](**arch)
