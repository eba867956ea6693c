"""Permutations of coordinates and circular shifts of angles (volume preserving, ``ladj = 0``)."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
from torch import Tensor

from .._checks import integer, real
from .._constants import ConstantsMixin
from .base import Transform
from .domains import DomainLike, DomainSpec, as_domains

__all__ = ["Permutation", "CircularShift"]


class Permutation(Transform):
    """Fixed permutation of the last axis: ``z = x[:, perm]``, ``ladj = 0``.

    The permutation is a buffer, so it is part of ``state_dict`` (a flow rebuilt with
    another seed reproduces the saved function after ``load_state_dict``). Use
    :meth:`reverse` (Dinh et al. 2017 alternate by reversal; Papamakarios et al. 2017
    MAF) or :meth:`random` (Kingma & Dhariwal 2018, "shuffle").

    Arguments:
        perm: ``(D,)`` a permutation of ``0..D-1``.

    Shapes:
        ``x``, ``z``: ``(batch, D)``; ``ladj``: ``(batch,)`` zeros.

    Raises:
        ValueError: ``perm`` is not a permutation of ``0..D-1`` (also when loaded by
            ``load_state_dict``, which re-derives ``inv_perm``); at call time, a context
            (the layer is unconditional).
    """

    volume_preserving = True

    def __init__(self, perm: Tensor | Sequence[int]):
        super().__init__()
        if isinstance(perm, numbers.Integral) or (isinstance(perm, Tensor) and perm.dim() == 0):
            raise ValueError(f"Permutation takes the permutation itself (a 1-D sequence of "
                             f"indices), got the single number {int(perm)}; for a number of "
                             "features use Permutation.reverse(features) or "
                             "Permutation.random(features)")
        raw = torch.as_tensor(perm)
        if raw.is_floating_point() and not torch.equal(raw, raw.round()):
            raise ValueError(f"a permutation needs integer indices, got {raw.tolist()}")
        perm = raw.to(torch.long)
        if perm.dim() != 1 or not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
            raise ValueError(f"not a permutation of 0..{perm.numel() - 1}: {perm.tolist()}")
        if perm.numel() == 0:
            raise ValueError("a permutation needs at least one coordinate")
        self.features = perm.numel()
        self.register_buffer("perm", perm)
        self.register_buffer("inv_perm", torch.argsort(perm))
        self._reversal = _is_reversal(perm)
        self.register_load_state_dict_post_hook(_check_loaded_perm)

    @classmethod
    def reverse(cls, features: int) -> "Permutation":
        """Reverse the order of ``features`` coordinates: ``perm = (D-1, ..., 0)``.

        The fixed reversal between layers used by Papamakarios et al. 2017 (MAF) and,
        on channels, by Dinh et al. 2017 (Real NVP).
        """
        features = integer("features", features, minimum=1)
        return cls(torch.arange(features - 1, -1, -1))

    @classmethod
    def random(cls, features: int, generator: torch.Generator | None = None) -> "Permutation":
        """A uniformly random permutation of ``features`` coordinates (from ``generator``).

        The "shuffle" permutation of Kingma & Dhariwal 2018 (Glow, section 3.2).
        """
        features = integer("features", features, minimum=1)
        return cls(torch.randperm(features, generator=generator))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        # a reversal is a flip (its backward a flip too, where index_select's scatters into
        # zeros); else index_select: several times faster than advanced indexing
        z = x.flip(1) if self._reversal else torch.index_select(x, 1, self.perm)
        return z, x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        x = z.flip(1) if self._reversal else torch.index_select(z, 1, self.inv_perm)
        return x, z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"perm={self.perm.tolist()}"


def _check_loaded_perm(module: Permutation, incompatible_keys=None) -> None:
    """After ``load_state_dict``: the loaded ``perm`` must be a permutation of the layer's
    coordinates, and ``inv_perm`` is re-derived from it (a stale or missing inverse would
    make the inverse silently wrong)."""
    perm = module.perm
    if perm.numel() != module.features or not torch.equal(
            torch.sort(perm).values, torch.arange(module.features, device=perm.device)):
        raise ValueError(f"loaded perm is not a permutation of 0..{module.features - 1}: "
                         f"{perm.tolist()}")
    module.inv_perm = torch.argsort(perm)
    module._reversal = _is_reversal(perm)


def _is_reversal(perm: Tensor) -> bool:
    """Whether ``perm`` is ``(D-1, ..., 0)``."""
    return torch.equal(perm.cpu(), torch.arange(perm.numel() - 1, -1, -1))


class CircularShift(ConstantsMixin, Transform):
    """Rotate circular coordinates by a fixed angle: ``z = wrap(x + shift)``, ``ladj = 0``.

    Circular splines fix the point ``-pi``; a shift between layers moves it (the
    periodic shift of normflows' circular flows, Rezende et al. 2020, section 3.2).
    Non-circular coordinates pass unchanged. Outputs lie in ``[low, high)``.

    Arguments:
        domains: one domain per coordinate (at least one circular).
        shift: the angle in radians (default half a period, ``pi``), added to every
            circular coordinate.

    Shapes:
        ``x``, ``z``: ``(batch, D)`` with ``D = len(domains)``; ``ladj``: ``(batch,)``
        zeros.

    Raises:
        ValueError: no circular coordinate, an unknown domain name, or a ``shift`` that
            is not a finite number; at call time, a context (the layer is unconditional).
    """

    volume_preserving = True

    def __init__(self, domains: Sequence[DomainLike], shift: float = math.pi):
        super().__init__()
        self.spec = DomainSpec(as_domains(domains, len(domains)))
        self.features = len(domains)
        if not self.spec.any_circular:
            raise ValueError("CircularShift needs at least one circular coordinate")
        self.shift = real("shift", shift)
        self.register_constant("offset", [self.shift if d.kind == "circle" else 0.0
                                          for d in self.spec.domains])

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        return self.spec.wrap(x + self.offset), x.new_zeros(x.shape[0])

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        return self.spec.wrap(z - self.offset), z.new_zeros(z.shape[0])

    def extra_repr(self) -> str:
        return f"shift={self.shift:.4f}"
