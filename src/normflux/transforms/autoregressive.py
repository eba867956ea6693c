"""Masked autoregressive layers: one mechanism for MAF, autoregressive NSF and circular AR splines."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import context_width, integer, same_context_width
from ..nets.made import MADE
from .base import Transform
from .bijections import Bijection
from .domains import DomainLike, as_domains

__all__ = ["MaskedAutoregressive"]


class MaskedAutoregressive(Transform):
    """Autoregressive layer ``z_i = f(x_i; theta_i(x_{<i}, context))`` with a MADE conditioner.

    The autoregressive twin of :class:`~normflux.transforms.Coupling`: pass the
    elementwise :class:`~normflux.transforms.Bijection` and get MAF (``Affine``;
    Papamakarios et al. 2017, eq. 3-5), the autoregressive rational-quadratic spline
    flow (``RQSpline``; Durkan et al. 2019, section 3.2), or the circular / mixed-domain
    autoregressive spline (``RQSpline`` with ``circle`` domains; Rezende et al. 2020).
    "``<i``" is with respect to the MADE's degrees (``order``).

    Cost: :meth:`forward` (density) is one MADE pass. :meth:`inverse` (sampling) is
    ``D`` sequential passes; pass ``k`` evaluates the MADE's hidden layers once and only
    the output rows and the bijection of the coordinate of degree ``k`` (no wasted
    per-coordinate work). The inverse is exact. ``Inverse(MaskedAutoregressive(...))``
    is an inverse autoregressive flow (IAF; Kingma et al. 2016): one-pass sampling,
    sequential density.

    Arguments:
        bijection: the elementwise bijection.
        made: ``None`` (a :class:`~normflux.nets.MADE` with ``hidden_features``,
            ``order``, ``residual``), a factory ``made(features, params_per_feature,
            context_features, input_index) -> MADE``, or a MADE built for
            ``bijection.num_params`` outputs per coordinate.
        features: ``D``.
        domains: one domain per coordinate (circular coordinates are fed to the MADE as
            ``(cos, sin)``); default all real.
        context_features: ``C`` or ``None``.
        hidden_features, order, residual, generator: for the default MADE.

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.

    Raises:
        TypeError: ``made`` (or what its factory returns) is not a
            :class:`~normflux.nets.MADE`.
        ValueError: ``features`` not an integer >= 1, ``context_features`` neither
            ``None`` nor an integer >= 1, domains the bijection does not support, a MADE of
            the wrong size or of another ``context_features``, a bad ``order`` (see
            :func:`~normflux.nets.autoregressive_order`); at call time, a context where
            none is expected (or none where one is, or of the wrong shape or dtype), an
            input not of the parameters' dtype.
    """

    def __init__(self, bijection: Bijection, made: MADE | Callable | None = None, *,
                 features: int, domains: DomainLike | Sequence[DomainLike] | None = None,
                 context_features: int | None = None,
                 hidden_features: Sequence[int] | int = (64, 64),
                 order: str | Sequence[int] | Tensor = "sequential", residual: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        D = integer("features", features, minimum=1)
        self.features = D
        self.bijection = bijection
        self.context_features = context_features = context_width(context_features)
        self.domains = as_domains(domains, D)
        self.spec = bijection.make_spec(self.domains)
        self.num_params = P = bijection.num_params(self.spec)
        # one single-coordinate spec per coordinate, for the sequential inverse
        self.specs = nn.ModuleList([bijection.make_spec([d]) for d in self.domains])
        if self.spec.all_real:
            for s in self.specs:
                s.all_real = True
        else:  # keep the parameter layout of the full layer
            for s in self.specs:
                s.all_real = False
        in_idx = torch.cat([self.spec.other_idx, self.spec.circ_idx, self.spec.circ_idx])
        if made is None:
            made = MADE(D, P, hidden_features, context_features, order=order,
                        input_index=in_idx, residual=residual, generator=generator,
                        transposed_output=bijection.batch_minor_params)
        elif not isinstance(made, nn.Module):
            made = made(D, P, context_features, in_idx)  # factory(features, P, C, input_index)
            if not isinstance(made, MADE):
                raise TypeError("the made factory must return a MADE, got "
                                f"{type(made).__name__}")
        if not isinstance(made, MADE):
            raise TypeError(f"made must be a MADE, a factory or None, got {type(made).__name__}")
        if made.features != D or made.params_per_feature != P:
            raise ValueError(f"MADE has {made.features} features x {made.params_per_feature} "
                             f"outputs, the layer needs {D} x {P}")
        same_context_width("MADE", made.context_features, context_features)
        self.made = made
        # every column, in order: the columns of a fused forward (Bijection.fused_coupling)
        self.register_buffer("_all_columns", torch.arange(D), persistent=False)

    def _made_input(self, x: Tensor) -> Tensor:
        """MADE input columns: real/interval coordinates, then cos and sin of angles."""
        return self.spec.features(x)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        params = self.made(self._made_input(x), context)
        fused = self.bijection.fused_coupling() if self.spec.all_real else None
        if fused is not None:  # the map, its ladj and their sum in one node (Affine)
            return fused(x, params, self._all_columns)
        z, lad = self.bijection(x, params, self.spec)
        return z, lad.sum(dim=1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        x = torch.zeros_like(z)
        ladj = z.new_zeros(z.shape[0])
        cols = torch.arange(self.features, device=z.device)
        params = self.made.sequential_params(context)  # masks applied once for all D passes
        for i in self.made.generation_order:
            p = params(self._made_input(x), i)
            xi, li = self.bijection.inverse(z[:, i:i + 1], p[:, None, :], self.specs[i])
            x = torch.where(cols == i, xi, x)
            ladj = ladj + li[:, 0]
        return x, ladj

    def extra_repr(self) -> str:
        return f"features={self.features}, order={self.made.degrees.tolist()}"

