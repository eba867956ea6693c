"""Planar and radial flows (Rezende & Mohamed, "Variational inference with normalizing
flows", ICML 2015, section 4.1 and appendix A).

Both papers' maps go from base to data (the generative direction), which is this
library's :meth:`inverse`: sampling is closed-form and one pass, as needed for
variational inference. The normalizing direction (:meth:`forward`, data -> base) has no
closed form for the planar flow: it reduces to a monotone scalar equation solved by
bisection then Newton to machine precision, with one differentiable Newton step from
the detached root, which gives exact gradients by the implicit function theorem. The
radial flow's forward is a quadratic in the radius, solved in closed form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .._checks import context_width, integer
from .base import Transform

__all__ = ["Planar", "Radial", "Sylvester"]


class _Hyper(nn.Module):
    """Per-sample parameters ``theta0 + A c`` (``A`` zero at init) or plain ``theta0``."""

    def __init__(self, init: Tensor, context_features: int | None):
        super().__init__()
        self.value = nn.Parameter(init)
        self.net = nn.Linear(context_features, init.numel()) if context_features else None
        if self.net is not None:
            nn.init.zeros_(self.net.weight)
            nn.init.zeros_(self.net.bias)

    def forward(self, context: Tensor | None, batch: int) -> Tensor:
        v = self.value.reshape(1, -1).expand(batch, -1)
        if self.net is not None and context is not None:
            v = v + self.net(context).expand(batch, -1)
        return v


class Planar(Transform):
    """Planar flow; generative map ``x = z + u_hat tanh(w.z + b)``.

    ``u_hat = u + (m(w.u) - w.u) w / |w|^2`` with ``m(a) = -1 + softplus(a)``
    guarantees ``w.u_hat > -1`` and hence invertibility (Rezende & Mohamed 2015,
    appendix A.1). ``log|det dx/dz| = log(1 + u_hat.w (1 - tanh^2(w.z + b)))``.

    :meth:`inverse` (base -> data) is the closed form; :meth:`forward` (data -> base)
    solves ``a + c tanh(a + b) = w.x`` for ``a = w.z`` (``c = w.u_hat``), monotone in
    ``a``, by 60 bisection steps on the bracket ``w.x +- |c|`` and 2 Newton steps
    (error at the float's resolution).

    Arguments:
        features: ``D``.
        context_features: ``C``; then ``u, w, b`` are affine functions of the context
            (amortised flows) whose context weights start at zero, so that every
            context starts with the same (random) ``u, w`` and ``b = 0``.
        init_scale: std of the random initial ``u`` and ``w`` (a non-identity start
            breaks the symmetry, as in the paper's experiments).

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.

    Raises:
        ValueError: ``features`` not an integer >= 1, ``context_features`` neither ``None``
            nor an integer >= 1; at call time, a context where none is expected (or none
            where one is, or of the wrong shape or dtype), an input not of the
            parameters' dtype.
    """

    exact_inverse = True

    def __init__(self, features: int, context_features: int | None = None,
                 init_scale: float = 0.1):
        super().__init__()
        D = integer("features", features, minimum=1)
        self.features = D
        self.context_features = context_features = context_width(context_features)
        self.u = _Hyper(init_scale * torch.randn(D), context_features)
        self.w = _Hyper(init_scale * torch.randn(D), context_features)
        self.b = _Hyper(torch.zeros(1), context_features)

    def _params(self, context: Tensor | None, batch: int) -> tuple[Tensor, Tensor, Tensor]:
        u, w, b = self.u(context, batch), self.w(context, batch), self.b(context, batch)[:, 0]
        wu = (w * u).sum(-1, keepdim=True)
        w2 = (w * w).sum(-1, keepdim=True).clamp(min=1e-12)
        u_hat = u + (F.softplus(wu) - 1 - wu) * w / w2
        return u_hat, w, b

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        u, w, b = self._params(context, z.shape[0])
        h = torch.tanh((w * z).sum(-1) + b)
        x = z + u * h[:, None]
        c = (u * w).sum(-1)
        return x, torch.log1p(c * (1 - h * h))

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        u, w, b = self._params(context, x.shape[0])
        c = (u * w).sum(-1)
        wx = (w * x).sum(-1)

        def g(a):
            return a + c * torch.tanh(a + b) - wx

        with torch.no_grad():
            lo, hi = wx - c.abs() - 1e-6, wx + c.abs() + 1e-6
            for _ in range(60):
                mid = 0.5 * (lo + hi)
                pos = g(mid) > 0
                hi = torch.where(pos, mid, hi)
                lo = torch.where(pos, lo, mid)
            a = 0.5 * (lo + hi)
            for _ in range(2):
                t = torch.tanh(a + b)
                a = a - g(a) / (1 + c * (1 - t * t))
        a = a.detach()
        t = torch.tanh(a + b)
        a = a - g(a) / (1 + c * (1 - t * t))  # differentiable step: implicit gradients
        h = torch.tanh(a + b)
        z = x - u * h[:, None]
        return z, -torch.log1p(c * (1 - h * h))

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Radial(Transform):
    """Radial flow; generative map ``x = z + beta h(r) (z - z0)``, ``h = 1 / (alpha + r)``.

    ``r = |z - z0|``, ``alpha = softplus(a) > 0`` and ``beta = -alpha + softplus(b')``
    so that ``beta >= -alpha`` (invertible; Rezende & Mohamed 2015, appendix A.2).
    ``log|det dx/dz| = (D - 1) log(1 + beta h) + log(1 + beta h - beta r h^2)``.

    :meth:`forward` (data -> base) is closed form: with ``rho = |x - z0|`` the radius
    solves ``r^2 + (alpha + beta - rho) r - rho alpha = 0`` (the positive root), and
    ``z - z0 = (x - z0) / (1 + beta h(r))``.

    Arguments:
        features: ``D``.
        context_features: ``C``; then ``z0, alpha, beta`` are affine in the context
            (context weights start at zero).
        init_scale: std of the random initial centre ``z0``.

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.

    Raises:
        ValueError: ``features`` not an integer >= 1, ``context_features`` neither ``None``
            nor an integer >= 1; at call time, a context where none is expected (or none
            where one is, or of the wrong shape or dtype), an input not of the
            parameters' dtype.
    """

    def __init__(self, features: int, context_features: int | None = None,
                 init_scale: float = 0.1):
        super().__init__()
        D = integer("features", features, minimum=1)
        self.features = D
        self.context_features = context_features = context_width(context_features)
        self.z0 = _Hyper(init_scale * torch.randn(D), context_features)
        self.a = _Hyper(torch.zeros(1), context_features)
        self.b = _Hyper(torch.full((1,), -2.0), context_features)

    def _params(self, context, batch):
        z0 = self.z0(context, batch)
        alpha = F.softplus(self.a(context, batch)[:, 0])
        beta = -alpha + F.softplus(self.b(context, batch)[:, 0])
        return z0, alpha, beta

    def _ladj(self, r: Tensor, alpha: Tensor, beta: Tensor) -> Tensor:
        h = 1 / (alpha + r)
        D = self.features
        return (D - 1) * torch.log1p(beta * h) + torch.log1p(beta * h - beta * r * h * h)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        z0, alpha, beta = self._params(context, z.shape[0])
        d = z - z0
        r = torch.linalg.vector_norm(d, dim=-1)
        x = z + (beta / (alpha + r))[:, None] * d
        return x, self._ladj(r, alpha, beta)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        z0, alpha, beta = self._params(context, x.shape[0])
        d = x - z0
        rho = torch.linalg.vector_norm(d, dim=-1)
        p = alpha + beta - rho
        sq = torch.sqrt(p * p + 4 * rho * alpha)
        # the positive root without cancellation
        r = torch.where(p > 0, 2 * rho * alpha / (p + sq).clamp(min=1e-30), 0.5 * (sq - p))
        z = z0 + d / (1 + beta / (alpha + r))[:, None]
        return z, -self._ladj(r, alpha, beta)

    def extra_repr(self) -> str:
        return f"features={self.features}"


class Sylvester(Transform):
    """Sylvester flow; generative map ``x = z + Q R h(R~ Q^T z + b)`` with ``h = tanh``.

    van den Berg et al., "Sylvester normalizing flows for variational inference", UAI
    2018, eq. 9-13. ``Q`` (``D x M``) has orthonormal columns, ``R`` and ``R~`` are
    ``M x M`` upper triangular with diagonals ``tanh(.)``, so ``R_ii R~_ii > -1`` and the
    map is invertible; ``log|det dx/dz| = sum_i log(1 + h'(.)_i R~_ii R_ii)``
    (Sylvester's determinant identity, eq. 10). ``Q`` is either a product of
    ``reflections`` Householder reflections (``M = D``; "Householder Sylvester") or the
    orthonormalised ``D x rank`` matrix of a QR decomposition ("orthogonal Sylvester").

    :meth:`inverse` (base -> data) is closed form. :meth:`forward` (data -> base): with
    ``v = Q^T z`` the equation ``v + R h(R~ v + b) = Q^T x`` is upper triangular, so it
    is solved by back-substitution, one monotone scalar equation per coordinate
    (bisection, 60 steps, then a Newton step), ``M`` sequential solves; one
    differentiable Newton step on the full system gives exact gradients. Cost
    ``O(M^2)`` per sample per scalar solve.

    Arguments:
        features: ``D``.
        rank: ``M`` for the orthogonal variant (default ``D``).
        reflections: number of Householder reflections (selects the Householder variant).
        context_features: ``C``; then ``R``, ``R~`` and ``b`` are affine in the context
            (context weights start at zero; ``Q`` does not depend on the context).
        init_scale: std of the random initial ``R``, ``R~`` (and, for the orthogonal
            variant, of the perturbation of the identity that ``Q`` is built from).

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.

    Raises:
        ValueError: ``features`` not an integer >= 1, ``rank`` outside ``1..D``,
            ``reflections < 1``, or both ``rank`` and ``reflections``; at call time, a
            context where none is expected (or none where one is, or of the wrong shape
            or dtype), an input not of the parameters' dtype.
    """

    def __init__(self, features: int, rank: int | None = None, reflections: int | None = None,
                 context_features: int | None = None, init_scale: float = 0.1):
        super().__init__()
        D = integer("features", features, minimum=1)
        if rank is not None and reflections is not None:
            raise ValueError("give either rank (orthogonal) or reflections (Householder)")
        M = D if rank is None else integer("rank", rank)
        if not 1 <= M <= D:
            raise ValueError(f"rank must be in 1..{D}, got {M}")
        self.features, self.rank = D, M
        self.context_features = context_features = context_width(context_features)
        self.reflections = reflections
        if reflections is not None:
            self.q_param = nn.Parameter(torch.randn(integer("reflections", reflections, minimum=1), D))
        else:
            self.q_param = nn.Parameter(torch.eye(D, M) + init_scale * torch.randn(D, M))
        self.r = _Hyper(init_scale * torch.randn(M, M), context_features)
        self.r_tilde = _Hyper(init_scale * torch.randn(M, M), context_features)
        self.b = _Hyper(torch.zeros(M), context_features)
        self.register_buffer("triu", torch.triu(torch.ones(M, M), 1), persistent=False)

    def _q(self) -> Tensor:
        if self.reflections is None:
            return torch.linalg.qr(self.q_param).Q
        Q = torch.eye(self.features, dtype=self.q_param.dtype, device=self.q_param.device)
        for v in self.q_param:
            v = v / torch.linalg.vector_norm(v).clamp(min=1e-12)
            Q = Q - 2 * torch.outer(Q @ v, v)
        return Q

    def _params(self, context, batch):
        M = self.rank

        def tri(p):
            m = p(context, batch).view(batch, M, M)
            return m * self.triu + torch.diag_embed(torch.tanh(torch.diagonal(m, dim1=-2, dim2=-1)))

        return self._q(), tri(self.r), tri(self.r_tilde), self.b(context, batch)

    @staticmethod
    def _ladj(pre: Tensor, R: Tensor, Rt: Tensor) -> Tensor:
        hp = 1 - torch.tanh(pre) ** 2
        diag = torch.diagonal(R, dim1=-2, dim2=-1) * torch.diagonal(Rt, dim1=-2, dim2=-1)
        return torch.log1p(hp * diag).sum(-1)

    def inverse(self, z: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(z, context)
        Q, R, Rt, b = self._params(context, z.shape[0])
        v = z @ Q
        pre = (Rt @ v[..., None])[..., 0] + b
        x = z + (R @ torch.tanh(pre)[..., None])[..., 0] @ Q.T
        return x, self._ladj(pre, R, Rt)

    def forward(self, x: Tensor, context: Tensor | None = None) -> tuple[Tensor, Tensor]:
        self._check(x, context)
        Q, R, Rt, b = self._params(context, x.shape[0])
        c = x @ Q  # (B, M)
        M = self.rank

        def F_(v):
            pre = (Rt @ v[..., None])[..., 0] + b
            return v + (R @ torch.tanh(pre)[..., None])[..., 0] - c, pre

        with torch.no_grad():
            v = torch.zeros_like(c)
            cols = torch.arange(M, device=x.device)
            for i in range(M - 1, -1, -1):
                # scalar equation in v_i with v_{>i} known (entries < i are still 0 and
                # do not enter rows >= i of the upper-triangular system)
                rii, rtii = R[:, i, i], Rt[:, i, i]
                e = (Rt[:, i, i + 1:] * v[:, i + 1:]).sum(-1) + b[:, i]
                pre_j = (Rt[:, i + 1:, :] @ v[..., None])[..., 0] + b[:, i + 1:]
                ci = c[:, i] - (R[:, i, i + 1:] * torch.tanh(pre_j)).sum(-1)

                def g(t, rii=rii, rtii=rtii, e=e, ci=ci):
                    return t + rii * torch.tanh(rtii * t + e) - ci

                lo, hi = ci - rii.abs() - 1e-6, ci + rii.abs() + 1e-6
                for _ in range(60):
                    mid = 0.5 * (lo + hi)
                    pos = g(mid) > 0
                    hi = torch.where(pos, mid, hi)
                    lo = torch.where(pos, lo, mid)
                t = 0.5 * (lo + hi)
                th = torch.tanh(rtii * t + e)
                t = t - g(t) / (1 + rii * rtii * (1 - th * th))
                v = torch.where(cols == i, t[:, None], v)
        v = v.detach()
        Fv, pre = F_(v)
        J = torch.eye(M, dtype=x.dtype, device=x.device) + R * (1 - torch.tanh(pre) ** 2)[:, None, :] @ Rt
        v = v - torch.linalg.solve_triangular(J, Fv[..., None], upper=True)[..., 0]
        pre = (Rt @ v[..., None])[..., 0] + b
        z = x - (R @ torch.tanh(pre)[..., None])[..., 0] @ Q.T
        return z, -self._ladj(pre, R, Rt)

    def extra_repr(self) -> str:
        kind = f"reflections={self.reflections}" if self.reflections else f"rank={self.rank}"
        return f"features={self.features}, {kind}"
