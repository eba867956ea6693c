"""Invertible linear maps on vectors, LU-parametrised (Kingma & Dhariwal 2018, section 3.2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import integer
from .base import Transform, is_compiling

__all__ = ["LULinear"]


class LULinear(Transform):
    """``z = W x + b`` with ``W = P L (U + diag(s))``, ``ladj = sum log|s|``.

    ``P`` is a fixed permutation (identity by default, a saved buffer), ``L`` unit lower
    triangular, ``U`` strictly upper triangular and ``s = exp(log_s)`` positive
    (Glow's LU-decomposed 1x1 convolution, Kingma & Dhariwal 2018, eq. 10; nflows'
    ``LULinear``). Starts as the identity. The log-determinant costs ``O(D)``.

    The inverse solves the two triangular systems (``O(D^2)`` per sample). In eval mode
    with gradients disabled (and outside ``torch.compile``) the explicit inverse matrix
    is cached and reused until the weights change (detected
    by comparing with a copy of the factors taken when it was built, so
    ``optimizer.step()``, ``load_state_dict`` and writes through ``.data`` all
    invalidate it).

    Arguments:
        features: ``D``.
        permutation: optional ``(D,)`` fixed permutation for ``P``.

    Shapes:
        ``x``: ``(batch, D)``; ``ladj``: ``(batch,)``.

    Raises:
        ValueError: ``features`` not an integer >= 1; at call time, a context is passed
            (the layer is unconditional) or an input not of the parameters' dtype.
    """

    def __init__(self, features: int, permutation: Tensor | None = None):
        super().__init__()
        D = integer("features", features, minimum=1)
        self.features = D
        self.lower = nn.Parameter(torch.zeros(D, D))
        self.upper = nn.Parameter(torch.zeros(D, D))
        self.log_s = nn.Parameter(torch.zeros(D))
        self.bias = nn.Parameter(torch.zeros(D))
        perm = torch.arange(D) if permutation is None else torch.as_tensor(permutation, dtype=torch.long)
        if perm.shape != (D,) or not torch.equal(torch.sort(perm).values, torch.arange(D)):
            raise ValueError(f"permutation must be a permutation of 0..{D - 1}, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("tril_mask", torch.tril(torch.ones(D, D), -1), persistent=False)
        self._cache: tuple | None = None

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.features, dtype=self.lower.dtype, device=self.lower.device)
        L = self.lower * self.tril_mask + eye
        U = self.upper * self.tril_mask.T + torch.diag(torch.exp(self.log_s))
        return L, U

    def weight(self) -> Tensor:
        """The matrix ``W = P L U`` (``z = W x + b``), ``(D, D)``, differentiable."""
        L, U = self._factors()
        return (L @ U)[torch.argsort(self.perm)]

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        L, U = self._factors()
        z = F.linear(F.linear(x, U), L)[:, torch.argsort(self.perm)] + self.bias
        return z, self.log_s.sum().expand(x.shape[0])

    def _cache_valid(self) -> bool:
        if self._cache is None:
            return False
        saved = self._cache[0]
        return all(a.dtype == p.dtype and a.device == p.device and torch.equal(a, p)
                   for a, p in zip(saved, (self.lower, self.upper, self.log_s)))

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        ladj = (-self.log_s.sum()).expand(z.shape[0])
        y = (z - self.bias).index_select(1, self.perm)
        if not self.training and not torch.is_grad_enabled() and not is_compiling():
            if not self._cache_valid():
                key = tuple(p.detach().clone() for p in (self.lower, self.upper, self.log_s))
                L, U = self._factors()
                eye = torch.eye(self.features, dtype=L.dtype, device=L.device)
                Linv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
                inv = torch.linalg.solve_triangular(U, Linv, upper=True)
                self._cache = (key, inv)
            return F.linear(y, self._cache[1]), ladj
        L, U = self._factors()
        v = torch.linalg.solve_triangular(L, y.T, upper=False, unitriangular=True)
        x = torch.linalg.solve_triangular(U, v, upper=True).T
        return x, ladj

    def __getstate__(self):
        state = super().__getstate__()
        state = dict(state)
        state["_cache"] = None
        return state

    def extra_repr(self) -> str:
        return f"features={self.features}"
