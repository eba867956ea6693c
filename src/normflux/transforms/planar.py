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

from .base import Transform

__all__ = ["Planar", "Radial"]


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
            (amortised flows), identity-initialised.
        init_scale: std of the random initial ``u`` and ``w`` (a non-identity start
            breaks the symmetry, as in the paper's experiments).

    Shapes:
        ``x``: ``(batch, D)``; ``context``: ``(batch, C)``; ``ladj``: ``(batch,)``.
    """

    exact_inverse = True

    def __init__(self, features: int, context_features: int | None = None,
                 init_scale: float = 0.1):
        super().__init__()
        D = int(features)
        self.features = D
        self.context_features = context_features
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
        context_features: ``C``; then ``z0, alpha, beta`` are affine in the context.
        init_scale: std of the random initial centre ``z0``.
    """

    def __init__(self, features: int, context_features: int | None = None,
                 init_scale: float = 0.1):
        super().__init__()
        D = int(features)
        self.features = D
        self.context_features = context_features
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
