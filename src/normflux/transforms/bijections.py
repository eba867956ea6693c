"""Elementwise monotone bijections, the pluggable part of coupling and autoregressive layers.

A bijection maps each coordinate ``x_i`` to ``y_i = f(x_i; theta_i)`` where ``theta_i``
(``num_params`` numbers) comes from a conditioner. It has no trainable parameters of its
own; the layer that uses it (:class:`~normflux.transforms.Coupling`, the autoregressive
layer) owns the network. A new bijection (a sum-of-squares polynomial, say) needs only
:meth:`Bijection.num_params`, :meth:`Bijection.forward` and :meth:`Bijection.inverse`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from .._checks import integer, real
from .._tracing import is_compiling
from . import native_affine
from ._first_order import reference_backward, use_reference
from .domains import DomainSpec
from .fused_spline import fused_rq_spline
from .splines import check_floors, rational_quadratic_spline, spline_knots

__all__ = ["Bijection", "Affine", "Additive", "RQSpline"]


class Bijection(nn.Module):
    """An elementwise monotone bijection with externally supplied parameters.

    Subclasses guarantee, for ``x`` of shape ``(batch, n)``, ``params`` of shape
    ``(batch, n, num_params(spec))`` and ``spec`` a :class:`DomainSpec` of the ``n``
    coordinates:

    * ``forward(x, params, spec) -> (y, ladj)`` with ``ladj`` elementwise ``(batch, n)``,
      ``log|dy_i/dx_i|``;
    * ``inverse(y, params, spec) -> (x, ladj)``, ``ladj = log|dx_i/dy_i|``;
    * all-zero parameters give the identity (so that layers start at the identity);
    * no boolean-mask indexing and no in-place writes (``vmap`` and ``torch.compile``).

    The library does not check monotonicity or the parameter layout for a subclass.
    """

    #: domain kinds the bijection supports ("real", "interval", "circle")
    supported_domains: tuple[str, ...] = ("real",)
    #: ladj does not depend on x (a shortcut some layers use)
    constant_jacobian: bool = False
    #: layers build their default conditioner with ``transposed_output`` (parameters in
    #: memory layout ``(n, P, batch)``), which this bijection reads without a copy
    batch_minor_params: bool = False

    def num_params(self, spec: DomainSpec) -> int:
        """Number ``P`` of parameters per coordinate for the coordinates of ``spec``.

        The conditioner outputs ``params`` of shape ``(batch, n, P)``.
        """
        raise NotImplementedError

    def make_spec(self, domains) -> DomainSpec:
        """A :class:`DomainSpec` for ``domains``, checked against :attr:`supported_domains`.

        Raises:
            ValueError: a domain this bijection cannot handle.
        """
        for d in domains:
            if d.kind not in self.supported_domains:
                raise ValueError(f"{type(self).__name__} does not support {d.kind} coordinates "
                                 f"(supported: {', '.join(self.supported_domains)}); "
                                 "use RQSpline for interval and circular coordinates")
        return DomainSpec(domains, getattr(self, "tail_bound", None))

    def forward(self, x: Tensor, params: Tensor, spec: DomainSpec) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def inverse(self, y: Tensor, params: Tensor, spec: DomainSpec) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def fused_coupling(self) -> Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]] | None:
        """A layer's whole forward step in one fused op, or ``None`` (the default).

        The callable maps ``(x, params, columns)`` to ``(y, ladj)``: ``x`` and ``y`` the
        layer's whole input and output ``(batch, D)``, ``columns`` the ``(n,)`` long
        indices of the transformed coordinates, ``params`` ``(batch, n, P)`` theirs,
        ``ladj`` ``(batch,)`` summed over them; the other columns pass through. Without
        it (and always for the inverse) :class:`~normflux.transforms.Coupling` splits the
        columns, calls :meth:`forward` and merges, one op each with its own backward;
        :class:`~normflux.transforms.MaskedAutoregressive` calls it with every column, in
        order (real coordinates only: it is asked only where the layer's domains are all
        real), else calls :meth:`forward` and sums ``ladj``.
        """
        return None


class Affine(Bijection):
    """Affine map ``y = x * exp(s) + t`` with a bounded log-scale.

    The raw scale output ``r`` is squashed as ``s = bound * tanh(r / bound)``, so that
    ``|log-scale| <= bound`` and no unbounded output is exponentiated (the "stable scale"
    of Real NVP / Glow implementations: Dinh et al. 2017 bound the scale network's output
    with a tanh, Kingma & Dhariwal 2018 use a sigmoid for the same purpose).
    ``params[..., 0]`` is the shift ``t``, ``params[..., 1]`` the raw scale ``r``. Real
    coordinates only.

    Arguments:
        log_scale_bound: the bound on ``|s|`` (default 3, a factor of e^3 ~ 20 per layer).

    Shapes:
        ``x``, ``y``: ``(batch, n)``; ``params``: ``(batch, n, 2)``; ``ladj``:
        ``(batch, n)``, ``s`` (``-s`` for the inverse).

    Raises:
        ValueError: ``log_scale_bound`` not a finite number > 0; :meth:`make_spec` with a
            non-real domain.
    """

    def __init__(self, log_scale_bound: float = 3.0):
        super().__init__()
        self.log_scale_bound = real("log_scale_bound", log_scale_bound, low=0, low_open=True)

    def num_params(self, spec: DomainSpec) -> int:
        """2: the shift ``t`` and the raw log-scale ``r``."""
        return 2

    def _scale(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[..., 0], _bounded_log_scale(params[..., 1], self.log_scale_bound)

    def forward(self, x, params, spec):
        if use_reference() or params.shape[:-1] != x.shape:
            # (broadcast parameters: autograd's reduction of the gradients is needed)
            return _affine(x, params[..., 0], params[..., 1], self.log_scale_bound)
        return _BoundedAffine.apply(x, params, self.log_scale_bound)

    def inverse(self, y, params, spec):
        t, s = self._scale(params)
        return (y - t) * torch.exp(-s), -s

    def fused_coupling(self):
        """:class:`_AffineCoupling` (see :meth:`Bijection.fused_coupling`), except where
        fused Functions step aside (:func:`use_reference`)."""
        if use_reference():
            return None
        bound = self.log_scale_bound
        return lambda x, params, columns: _AffineCoupling.apply(x, params, columns, bound)[:2]

    def extra_repr(self) -> str:
        return f"log_scale_bound={self.log_scale_bound}"


def _affine(x: Tensor, t: Tensor, r: Tensor, bound: float) -> tuple[Tensor, Tensor]:
    """``(x exp(s) + t, s)`` with ``s = bound tanh(r / bound)``: the reference of
    :class:`_BoundedAffine` (plain differentiable ops)."""
    s = _bounded_log_scale(r, bound)
    return x * torch.exp(s) + t, s


def _bounded_log_scale(r: Tensor, bound: float) -> Tensor:
    """``bound * tanh(r / bound)``: the log-scale, in ``(-bound, bound)``."""
    return bound * torch.tanh(r / bound)


class _BoundedAffine(torch.autograd.Function):
    """:func:`_affine` of ``(x, params)`` (``t, r = params[..., 0], params[..., 1]``) with a
    closed-form backward that keeps only ``x`` and the log-scale ``s`` (an output): ``exp(s)``
    and ``tanh(r / bound) = s / bound`` are recomputed from it, where autograd would keep
    ``x``, ``tanh(r / bound)`` and ``exp(s)``. Same forward ops, so bit-identical values.

    The gradient of ``params`` is written in place into one ``(..., n, 2)`` tensor: no
    zero-filled halves to add, as autograd's backward of ``params[..., 0]`` and
    ``params[..., 1]`` would: a quarter of the affine map's forward and backward on the
    shapes of B2 in the speed suite (about 5 % of its train step). A backward that is
    itself differentiated (``create_graph=True``) or batched runs the same formula out of
    place: differentiable ops on the saved output ``s``, whose own gradient is this
    Function's (as for :func:`torch.exp`); so does a backward traced by
    ``torch.compile``."""

    @staticmethod
    def forward(ctx, x, params, bound):
        t, r = params.unbind(-1)
        y, s = _affine(x, t, r, bound)
        if not ctx.needs_input_grad[1]:
            ctx.mark_non_differentiable(s)  # s depends on the parameters only
        ctx.save_for_backward(x, s)
        ctx.bound = bound
        return y, s

    @staticmethod
    def backward(ctx, gy, gs):
        x, s = ctx.saved_tensors
        bound = ctx.bound
        g_x = gy * torch.exp(s)
        if not ctx.needs_input_grad[1]:
            return g_x, None, None
        # create_graph=True and batched VJPs: differentiable ops on the saved output s
        out_of_place = reference_backward(gy, gs) or is_compiling()
        return g_x, _affine_params_grad(gy, gs, g_x, x, s / bound, out_of_place), None


def _affine_params_grad(gy: Tensor, gs: Tensor, g_x: Tensor, x: Tensor, th: Tensor,
                        out_of_place: bool) -> Tensor:
    """The ``(..., n, 2)`` gradient of ``params = (t, r)`` of the bounded affine map, from
    the gradients ``gy`` of ``y`` and ``gs`` of ``s`` (any shape that broadcasts), ``g_x =
    gy exp(s)`` and ``th = tanh(r / bound)``: ``dy/dt = 1``, ``ds/dr = 1 - th^2``, ``dy/dr =
    x exp(s) ds/dr``. In place into one tensor, or (``out_of_place``: differentiable, and
    for inductor, as dynamo cannot trace a strided ``out=``) stacked."""
    if out_of_place:
        return torch.stack((gy, torch.addcmul(gs, g_x, x) * (1 - th * th)), -1)
    g = torch.empty(x.shape + (2,), dtype=x.dtype, device=x.device)
    g_t, g_r = g.unbind(-1)
    g_t.copy_(gy)
    torch.mul(torch.addcmul(gs, g_x, x), torch.addcmul(_one(x), th, th, value=-1), out=g_r)
    return g


def _affine_coupling(x: Tensor, params: Tensor, columns: Tensor, bound: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The forward of an affine coupling layer with plain differentiable ops:
    ``(y, ladj, s)``, the ``columns`` of ``x`` mapped by :func:`_affine`, their log-scales
    ``s`` and ``ladj`` summed over them (the tensor-op path of :class:`_AffineCoupling`)."""
    y_b, s = _affine(x.index_select(1, columns), params[..., 0], params[..., 1], bound)
    return x.index_copy(1, columns, y_b), s.sum(1), s


class _AffineCoupling(torch.autograd.Function):
    """An affine coupling layer's forward in one node: ``(x (batch, D), params (batch, n,
    2), columns (n,), bound) -> (y (batch, D), ladj (batch,), s (batch, n))``, the map of
    :func:`_affine_coupling` with a closed-form backward (an affine autoregressive layer's
    too: every column, in order).

    One node in place of five (the split of the columns, the affine map, the merge, the
    sum of ``ladj`` and a view), whose fixed cost dominates small layers; on CPU tensors
    both passes are one call of a C kernel each (:mod:`~normflux.transforms.native_affine`,
    computing in double), elsewhere (and under ``torch.compile``) the tensor ops of
    :func:`_affine_coupling`. Keeps only the log-scales ``s`` beside ``x`` (which the
    conditioner's input, a view of it for block and alternating masks, keeps alive
    anyway), as the split path does. ``s``
    is an output so that, as in :class:`_BoundedAffine`, a backward with
    ``create_graph=True`` or batched is the closed form in differentiable ops on ``x`` and
    ``s``, exact to every order."""

    @staticmethod
    def forward(ctx, x, params, columns, bound):
        ctx.set_materialize_grads(False)
        if native_affine.usable(x, params):
            y, ladj, s = native_affine.forward(x, params, columns, bound)
        else:
            y, ladj, s = _affine_coupling(x, params, columns, bound)
        if not ctx.needs_input_grad[1]:
            ctx.mark_non_differentiable(ladj, s)  # they depend on the parameters only
        ctx.save_for_backward(x, columns, s)
        ctx.bound = bound
        return y, ladj, s

    @staticmethod
    def backward(ctx, gy, gl, gs):
        x, columns, s = ctx.saved_tensors
        if gy is None:
            gy = torch.zeros_like(x)
        if gl is None:
            gl = x.new_zeros(x.shape[0])
        out_of_place = reference_backward(gy, gl, gs) or is_compiling()
        if not out_of_place and native_affine.usable(x, s, gy, gl, gs):
            g_x, g_p = native_affine.backward(gy, gl, gs, x, columns, s, ctx.bound,
                                              ctx.needs_input_grad[0])
            return g_x, g_p, None, None
        gy_b = gy.index_select(1, columns)
        g_xb = gy_b * torch.exp(s)
        g_x = gy.index_copy(1, columns, g_xb) if ctx.needs_input_grad[0] else None
        g_s = gl[:, None] if gs is None else gl[:, None] + gs
        g_p = _affine_params_grad(gy_b, g_s, g_xb, x.index_select(1, columns), s / ctx.bound,
                                  out_of_place)
        return g_x, g_p, None, None


def _one(x: Tensor) -> Tensor:
    """A 0-d one of ``x``'s dtype and device (the ``1`` of ``1 - tanh^2``, one fused op)."""
    return torch.ones((), dtype=x.dtype, device=x.device)


class Additive(Bijection):
    """Volume-preserving shift ``y = x + t`` (NICE; Dinh et al. 2015, eq. 5). ``ladj = 0``.

    ``params[..., 0]`` is the shift ``t``. Real coordinates only.

    Shapes:
        ``x``, ``y``: ``(batch, n)``; ``params``: ``(batch, n, 1)``; ``ladj``:
        ``(batch, n)`` zeros.

    Raises:
        ValueError: :meth:`make_spec` with a non-real domain.
    """

    constant_jacobian = True

    def num_params(self, spec: DomainSpec) -> int:
        """1: the shift ``t``."""
        return 1

    def forward(self, x, params, spec):
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y, params, spec):
        return y - params[..., 0], torch.zeros_like(y)


class RQSpline(Bijection):
    """Monotone rational-quadratic spline on real, interval and circular coordinates.

    Durkan et al., "Neural Spline Flows" (NeurIPS 2019), eq. 4, with the knots of
    :func:`~normflux.transforms.splines.spline_knots`:

    * ``real``: the spline on ``[-tail_bound, tail_bound]``, the identity outside (linear
      tails, ``ladj = 0``); ``3K - 1`` parameters when every coordinate is real;
    * ``interval(a, b)``: the spline on ``[a, b]`` with free boundary slopes (inputs
      outside ``[a, b]`` pass unchanged);
    * ``circle``: angles (radians) are first wrapped into the circle's ``[low, high)``
      (``[-pi, pi)`` for :data:`~normflux.transforms.circle`); the spline fixes both
      ends and has equal slopes there, a diffeomorphism of the circle (Rezende et
      al., "Normalizing flows on tori and spheres", ICML 2020, section 3.2). Compose with
      :class:`~normflux.transforms.CircularShift` so that the fixed point moves.

    With any non-real coordinate every coordinate takes ``3K + 1`` parameters (unused
    entries are ignored).

    Arguments:
        bins: number of bins ``K`` (default 8).
        tail_bound: ``B`` for real coordinates (default 3).
        min_bin_width, min_bin_height, min_derivative: numerical floors (default 1e-3;
            ``min_bin_width * K`` and ``min_bin_height * K`` must be below 1).

    Shapes:
        ``x``, ``y``: ``(batch, n)``; ``params``: ``(batch, n, P)`` with ``P =``
        :meth:`num_params`; ``ladj``: ``(batch, n)``, elementwise ``log|dy_i/dx_i|``.

    Raises:
        ValueError: ``bins`` not an integer >= 1, ``tail_bound`` not a finite number > 0,
            ``min_derivative`` outside ``[0, 1)``, negative bin floors or floors of
            ``1 / K`` or more; at call time, ``params`` whose last dimension is not
            :meth:`num_params`.
    """

    supported_domains = ("real", "interval", "circle")
    batch_minor_params = True

    def __init__(self, bins: int = 8, tail_bound: float = 3.0, min_bin_width: float = 1e-3,
                 min_bin_height: float = 1e-3, min_derivative: float = 1e-3):
        super().__init__()
        bins = integer("bins", bins, minimum=1)
        tail_bound = real("tail_bound", tail_bound, low=0, low_open=True)
        min_bin_width, min_bin_height, min_derivative = (
            real(name, v) for name, v in (("min_bin_width", min_bin_width),
                                          ("min_bin_height", min_bin_height),
                                          ("min_derivative", min_derivative)))
        check_floors(bins, min_bin_width, min_bin_height, min_derivative)
        self.bins = int(bins)
        self.tail_bound = float(tail_bound)
        self.min_bin_width = min_bin_width
        self.min_bin_height = min_bin_height
        self.min_derivative = min_derivative

    def num_params(self, spec: DomainSpec) -> int:
        """``3K - 1`` when every coordinate of ``spec`` is real, else ``3K + 1``."""
        return 3 * self.bins - 1 if spec.all_real else 3 * self.bins + 1

    def _knots(self, params: Tensor, spec: DomainSpec):
        return spline_knots(params, spec.low.to(params.dtype), spec.high.to(params.dtype),
                            None if spec.all_real else spec.kind, bins=self.bins,
                            min_bin_width=self.min_bin_width, min_bin_height=self.min_bin_height,
                            min_derivative=self.min_derivative)

    def _apply_spline(self, x, params, spec, inverse):
        if spec.all_real:
            # same map, fused with a closed-form backward (eager fast path)
            return fused_rq_spline(x, params, spec.low.to(params.dtype), spec.high.to(params.dtype),
                                   bins=self.bins, min_bin_width=self.min_bin_width,
                                   min_bin_height=self.min_bin_height,
                                   min_derivative=self.min_derivative, inverse=inverse)
        return rational_quadratic_spline(spec.wrap(x), *self._knots(params, spec), inverse=inverse)

    def forward(self, x, params, spec):
        return self._apply_spline(x, params, spec, inverse=False)

    def inverse(self, y, params, spec):
        return self._apply_spline(y, params, spec, inverse=True)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, tail_bound={self.tail_bound}"
