"""Coupling layers: one mechanism for NICE, Real NVP, spline and circular couplings."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .._checks import context_width, integer, same_context_width
from ..nets.mlp import MLP
from .base import Transform
from .bijections import Bijection
from .domains import DomainLike, DomainSpec, as_domains

__all__ = ["Coupling", "make_mask"]


def make_mask(kind: str, features: int, *, flip: bool = False,
              generator: torch.Generator | None = None) -> Tensor:
    """A boolean coupling mask of ``features`` entries; ``True`` marks transformed coordinates.

    Arguments:
        kind: ``"alternating"`` (odd positions 1, 3, ... transformed), ``"half"`` (the
            second half transformed) or ``"random"`` (a random half, drawn from
            ``generator``).
        features: the number of coordinates, >= 2.
        flip: negate the mask (the complementary layer of a pair).
        generator: random generator for ``"random"``.

    Returns:
        a ``(features,)`` boolean tensor (``ceil(features / 2)`` entries ``True`` for
        ``"half"`` and ``"random"``, ``floor(features / 2)`` for ``"alternating"``;
        complemented when ``flip``).

    Raises:
        ValueError: an unknown kind or fewer than 2 features.
    """
    if features < 2:
        raise ValueError(f"a coupling mask needs at least 2 features, got {features}")
    if kind == "alternating":
        mask = torch.arange(features) % 2 == 1
    elif kind == "half":
        mask = torch.arange(features) >= features // 2
    elif kind == "random":
        perm = torch.randperm(features, generator=generator)
        mask = torch.zeros(features, dtype=torch.bool)
        mask[perm[features // 2:]] = True
    else:
        raise ValueError(f"unknown mask kind {kind!r}: use 'alternating', 'half', 'random' "
                         "or an explicit boolean tensor")
    return ~mask if flip else mask


class Coupling(Transform):
    """Coupling layer ``y_A = x_A, y_B = f(x_B; theta(x_A, context))``.

    One class for every coupling flow (Dinh et al. 2015 NICE, eq. 4; Dinh et al. 2017
    Real NVP, eq. 4-6; Durkan et al. 2019 NSF, section 3.1; the circular spline coupling
    of Rezende et al. 2020): pass the elementwise :class:`Bijection` (``Additive``,
    ``Affine``, ``RQSpline``) and the mask. The conditioner sees the untouched
    coordinates ``x_A`` (circular ones as ``(cos, sin)``), concatenated with the context.

    ``ladj = sum_{i in B} log|f'(x_i)|``; the inverse is exact and costs one conditioner
    pass.

    Arguments:
        bijection: the elementwise bijection ``f``.
        conditioner: ``None`` (an :class:`~normflux.nets.MLP` with ``hidden_features``,
            zero last layer so that the layer starts as the identity), a factory
            ``conditioner(in_features, out_features, context_features) -> nn.Module``, or
            a module mapping ``(batch, in_features)`` and ``context`` to
            ``(batch, n_B * bijection.num_params)``.
        mask: ``(features,)`` booleans, ``True`` for transformed coordinates, or a kind
            for :func:`make_mask` (``"alternating"``, ``"half"``, ``"random"``).
        features: number of coordinates ``D`` (needed when ``mask`` is a kind).
        domains: one :class:`~normflux.transforms.domains.Domain` per coordinate (or one
            for all); default all real.
        context_features: context width ``C`` or ``None``.
        hidden_features: hidden widths of the default conditioner.
        flip: negate the mask.
        generator: random generator for a random mask.

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.

    Raises:
        TypeError: ``bijection`` not a :class:`Bijection`; a ``conditioner`` that is
            neither ``None``, a module nor a factory, or a factory that returns no module.
        ValueError: a mask with no transformed or no conditioning coordinate, a mask that
            is not 1-D, has the wrong length or entries other than booleans (or 0 and 1),
            ``features`` not an integer >= 2, a mask kind without ``features`` (or an
            unknown kind), domains the bijection does not support, ``context_features``
            neither ``None`` nor an integer >= 1, a conditioner whose own
            ``context_features`` differ; at call time, a context where none is expected
            (or none where one is, or of the wrong shape or dtype), an input not of the
            parameters' dtype, a conditioner output of another shape than ``(batch, n_B *
            bijection.num_params)`` or ``(batch, n_B, bijection.num_params)``.
    """

    def __init__(self, bijection: Bijection, conditioner: nn.Module | Callable | None = None,
                 mask: Tensor | Sequence[bool] | str = "alternating", *, features: int | None = None,
                 domains: DomainLike | Sequence[DomainLike] | None = None,
                 context_features: int | None = None,
                 hidden_features: Sequence[int] | int = (64, 64), flip: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(bijection, Bijection):
            raise TypeError("bijection must be a normflux Bijection (Affine, RQSpline, ...), "
                            f"got {type(bijection).__name__}")
        if features is not None:
            features = integer("features", features, minimum=2)
        if isinstance(mask, str):
            if features is None:
                raise ValueError(f"mask={mask!r} needs features=...")
            mask = make_mask(mask, features, flip=flip, generator=generator)
        else:
            mask = torch.as_tensor(mask)
            if mask.dtype != torch.bool:
                if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError("mask entries must be booleans (or 0 and 1), got "
                                     f"{mask.tolist()}")
                mask = mask.bool()
            if flip:
                mask = ~mask
            if mask.dim() != 1:
                raise ValueError(f"mask must be 1-D, got shape {tuple(mask.shape)}")
            if features is not None and features != mask.numel():
                raise ValueError(f"mask has {mask.numel()} entries for {features} features")
        n_b = int(mask.sum())
        if n_b == 0 or n_b == mask.numel():
            raise ValueError("a coupling mask needs at least one transformed (True) and one "
                             f"conditioning (False) coordinate, got {mask.tolist()}")
        self.features = mask.numel()
        self.bijection = bijection
        self.context_features = context_features = context_width(context_features)
        self.domains = as_domains(domains, self.features)
        self.register_buffer("mask", mask)
        self._rebuild()
        P = bijection.num_params(self.spec_b)
        self.num_params = P
        n_in = self.spec_a.num_features()
        if conditioner is None:
            conditioner = MLP(n_in, n_b * P, hidden_features, context_features,
                              transposed_output=bijection.batch_minor_params)
        elif not isinstance(conditioner, nn.Module):
            if not callable(conditioner):
                raise TypeError("conditioner must be None, an nn.Module or a factory, got "
                                f"{type(conditioner).__name__}")
            conditioner = conditioner(n_in, n_b * P, context_features)
            if not isinstance(conditioner, nn.Module):
                raise TypeError("the conditioner factory must return an nn.Module, got "
                                f"{type(conditioner).__name__}")
        same_context_width("conditioner", getattr(conditioner, "context_features",
                                                  context_features), context_features)
        self.conditioner = conditioner

    def _rebuild(self) -> None:
        """Derive index buffers and domain specs from ``self.mask`` (also after loading)."""
        mask = self.mask
        idx_b = torch.nonzero(mask).flatten()
        idx_a = torch.nonzero(~mask).flatten()
        self.register_buffer("idx_a", idx_a, persistent=False)
        self.register_buffer("idx_b", idx_b, persistent=False)
        self._plan = _split_plan(idx_a.tolist(), idx_b.tolist(), mask.numel())
        old = getattr(self, "spec_b", None)
        dtype = old.low.dtype if old is not None else torch.get_default_dtype()
        self.spec_a = DomainSpec([self.domains[i] for i in idx_a.tolist()]).to(mask.device, dtype)
        self.spec_b = self.bijection.make_spec([self.domains[i] for i in idx_b.tolist()]).to(
            mask.device, dtype)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._rebuild()

    def _params(self, x_a: Tensor, context: Tensor | None) -> Tensor:
        h = self.spec_a.features(x_a)
        out = self.conditioner(h, context) if self.context_features is not None else self.conditioner(h)
        n, n_b, P = x_a.shape[0], self.idx_b.numel(), self.num_params
        if not isinstance(out, Tensor) or tuple(out.shape) not in ((n, n_b * P), (n, n_b, P)):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the conditioner must return a tensor of shape ({n}, {n_b * P}) "
                             f"(batch, transformed coordinates x parameters each = "
                             f"{n_b} x {P}) or ({n}, {n_b}, {P}), got {got}")
        return out.view(n, n_b, P)

    def _couple(self, x: Tensor, context: Tensor | None, inverse: bool) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        fused = None if inverse else self.bijection.fused_coupling()
        if fused is not None:
            return fused(x, self._params(self._columns_a(x), context), self.idx_b)
        x_a, x_b = self._split(x)
        params = self._params(x_a, context)
        f = self.bijection.inverse if inverse else self.bijection.forward
        y_b, lad = f(x_b, params, self.spec_b)
        return self._merge(x_a, y_b, x), lad.sum(dim=1)

    # Half and alternating masks are a split into blocks or pairs, whose views and cat /
    # stack cost one op each way (also in the backward); other masks gather and scatter.
    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        plan = self._plan
        if plan == "blocks":
            return x.split([self.idx_a.numel(), self.idx_b.numel()], 1)
        if plan == "blocks, B first":
            x_b, x_a = x.split([self.idx_b.numel(), self.idx_a.numel()], 1)
            return x_a, x_b
        if plan == "pairs":
            return x.unflatten(1, (-1, 2)).unbind(-1)
        if plan == "pairs, B first":
            x_b, x_a = x.unflatten(1, (-1, 2)).unbind(-1)
            return x_a, x_b
        return x.index_select(1, self.idx_a), x.index_select(1, self.idx_b)

    def _columns_a(self, x: Tensor) -> Tensor:
        """``x_A``, the first part of :meth:`_split`, alone (a view unless the mask is
        irregular)."""
        plan, n_a, n_b = self._plan, self.idx_a.numel(), self.idx_b.numel()
        if plan is None:
            return x.index_select(1, self.idx_a)
        if plan.startswith("blocks"):
            return x[:, n_b:] if plan.endswith("B first") else x[:, :n_a]
        return x[:, 1::2] if plan.endswith("B first") else x[:, 0::2]

    def _merge(self, x_a: Tensor, y_b: Tensor, x: Tensor) -> Tensor:
        """``x`` with its B columns replaced by ``y_b``."""
        plan = self._plan
        if plan is None:
            return x.index_copy(1, self.idx_b, y_b)
        parts = (y_b, x_a) if plan.endswith("B first") else (x_a, y_b)
        return torch.cat(parts, 1) if plan.startswith("blocks") else torch.stack(parts, -1).flatten(1)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(x, context, inverse=False)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self._couple(z, context, inverse=True)

    def extra_repr(self) -> str:
        return f"features={self.features}, transformed={self.idx_b.tolist()}"


def _split_plan(idx_a: list[int], idx_b: list[int], features: int) -> str | None:
    """How a coupling separates its columns: ``"blocks"`` (A then B), ``"pairs"`` (A, B
    interleaved starting with A), the same with ``", B first"``, or ``None`` (any other
    mask: index_select / index_copy)."""
    na, nb = len(idx_a), len(idx_b)
    for first, second, tag in ((idx_a, idx_b, ""), (idx_b, idx_a, ", B first")):
        if first == list(range(len(first))) and second == list(range(len(first), features)):
            return "blocks" + tag
        if features % 2 == 0 and na == nb and first == list(range(0, features, 2)) \
                and second == list(range(1, features, 2)):
            return "pairs" + tag
    return None
