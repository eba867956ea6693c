"""Rational-quadratic splines: the functional core, C01 (inverse next to a knot), C02
(linear tails) and C16 (circular splines)."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import jacobian_logdet, jitter_, seeded, wrap_angle

import normflux
from normflux.transforms import (
    Chain,
    CircularShift,
    Coupling,
    Inverse,
    MaskedAutoregressive,
    RQSpline,
    circle,
    rational_quadratic_spline,
    real,
    spline_knots,
)

F32, F64 = torch.float32, torch.float64
EPS32 = torch.finfo(F32).eps


def knots(params, low=-3.0, high=3.0, kind=None, bins=None):
    """``spline_knots`` for params ``(n, P)`` on a box shared by the n coordinates."""
    n = params.shape[0]
    lo = torch.full((n,), low, dtype=params.dtype)
    hi = torch.full((n,), high, dtype=params.dtype)
    if bins is None:
        bins = (params.shape[-1] + 1) // 3 if kind is None else (params.shape[-1] - 1) // 3
    return spline_knots(params, lo, hi, kind, bins=bins)


def rqs(x, xk, yk, dk, inverse=False):
    """Evaluate one spline (knots of shape (1, K+1)) at every entry of a 1-D ``x``."""
    e = [t.expand(x.shape[0], -1) for t in (xk, yk, dk)]
    return rational_quadratic_spline(x, *e, inverse=inverse)


# ------------------------------------------------------------------ functional core
def test_zero_parameters_give_identity():
    for K in (1, 4, 8):
        p = torch.zeros(3, 3 * K - 1, dtype=F64)
        xk, yk, dk = knots(p)
        assert torch.allclose(xk, torch.linspace(-3, 3, K + 1, dtype=F64).expand(3, -1))
        assert torch.equal(xk, yk) and torch.allclose(dk, torch.ones_like(dk), atol=1e-15)
        x = torch.linspace(-4, 4, 101, dtype=F64)
        y, lad = rqs(x, xk[:1], yk[:1], dk[:1])
        assert torch.allclose(y, x, atol=1e-14) and lad.abs().max() < 1e-14


@pytest.mark.parametrize("kind", [None, 0, 1, 2])
def test_knot_invariants(kind):
    g = torch.Generator().manual_seed(0)
    K = 6
    P = 3 * K - 1 if kind is None else 3 * K + 1
    p = 5 * torch.randn(50, P, generator=g, dtype=F64)
    kinds = None if kind is None else torch.full((50,), kind, dtype=torch.long)
    xk, yk, dk = knots(p, -2.0, 1.0, kinds, bins=K)
    for k in (xk, yk):
        assert torch.equal(k[:, 0], torch.full((50,), -2.0, dtype=F64))
        assert torch.equal(k[:, -1], torch.full((50,), 1.0, dtype=F64))
        assert (k.diff(dim=-1) >= 3 * 1e-3 * (1 - 1e-9)).all()  # min bin fraction of the box
    assert (dk >= 1e-3).all()
    if kind in (None, 0):
        assert (dk[:, 0] == 1).all() and (dk[:, -1] == 1).all()  # linear tails: C1 at +-B
    elif kind == 2:
        assert torch.equal(dk[:, 0], dk[:, -1])  # periodic: C1 on the circle
        assert not torch.allclose(dk[:, 0], torch.ones(50, dtype=F64))
    else:
        assert not torch.allclose(dk[:, 0], dk[:, -1])  # interval: both ends free


def test_spline_knots_errors():
    with pytest.raises(ValueError, match="parameters per coordinate"):
        knots(torch.zeros(1, 10), bins=4)
    for floors in (dict(min_bin_width=0.3), dict(min_bin_height=-0.05)):
        with pytest.raises(ValueError, match="must be >= 0 with floor \\* bins < 1"):
            spline_knots(torch.zeros(1, 11), torch.tensor([-1.0]), torch.tensor([1.0]), bins=4,
                         **floors)


def test_monotone_continuous_and_ladj_is_log_slope():
    """Random splines: strictly increasing, y(knot) = knot, ladj = log dy/dx (autograd)."""
    g = torch.Generator().manual_seed(1)
    for K in (3, 8):
        p = 3 * torch.randn(1, 3 * K - 1, generator=g, dtype=F64)
        xk, yk, dk = knots(p)
        x = torch.linspace(-3.5, 3.5, 4001, dtype=F64, requires_grad=True)
        y, lad = rqs(x, xk, yk, dk)
        (dy,) = torch.autograd.grad(y.sum(), x)
        assert (y.diff() > 0).all()
        assert torch.allclose(lad, dy.log(), atol=1e-10)
        yknot, _ = rqs(xk[0], xk, yk, dk)
        assert torch.allclose(yknot, yk[0], atol=1e-14)
        # both sides of each knot agree (continuity of value and of slope = d_k)
        h = 1e-12
        for side in (-h, h):
            ys, ls = rqs(xk[0, 1:-1] + side, xk, yk, dk)
            assert torch.allclose(ys, yk[0, 1:-1], atol=1e-9)
            assert torch.allclose(ls, dk[0, 1:-1].log(), atol=1e-6)


@pytest.mark.parametrize("inverse", [False, True])
def test_gradcheck(inverse):
    """The spline's (hand-written) backward agrees with finite differences, first and
    second order, for inputs inside the box and in the tails."""
    g = torch.Generator().manual_seed(2)
    K, n = 5, 9
    p = (2 * torch.randn(n, 3 * K - 1, generator=g, dtype=F64)).requires_grad_()
    x = torch.cat([4 * torch.rand(n - 2, generator=g, dtype=F64) - 2,
                   torch.tensor([3.7, -5.0], dtype=F64)]).requires_grad_()
    lo, hi = torch.full((n,), -3.0, dtype=F64), torch.full((n,), 3.0, dtype=F64)

    def f(x, p):
        return rational_quadratic_spline(x, *spline_knots(p, lo, hi, bins=K), inverse=inverse)

    assert torch.autograd.gradcheck(f, (x, p))
    assert torch.autograd.gradgradcheck(f, (x, p))


@pytest.mark.parametrize("kind", [1, 2])
def test_gradcheck_interval_and_circle(kind):
    g = torch.Generator().manual_seed(5)
    K, n = 4, 6
    p = (torch.randn(n, 3 * K + 1, generator=g, dtype=F64)).requires_grad_()
    x = (1.8 * torch.rand(n, generator=g, dtype=F64) - 0.9).requires_grad_()
    lo, hi = torch.full((n,), -1.0, dtype=F64), torch.full((n,), 1.0, dtype=F64)
    kinds = torch.full((n,), kind, dtype=torch.long)
    for inverse in (False, True):
        assert torch.autograd.gradcheck(
            lambda x, p: rational_quadratic_spline(x, *spline_knots(p, lo, hi, kinds, bins=K),
                                                   inverse=inverse), (x, p))


# ------------------------------------------------------------------------------- C01
# 4 bins on [-3, 3], equal widths, interior slopes (0.694147, 20.001, 0.001000002).
C01_XK = (-3.0, -1.5, 0.0, 1.5, 3.0)
C01_DK = (1.0, 0.694147, 20.001, 0.001000002, 1.0)
C01_A = dict(yk=(-3.0, -2.994, -2.988, -2.982, 3.0), y=-2.9820001125335693,
             x=1.4997026, ladj=8.283, sign=1.0)
C01_B = dict(yk=(-3.0, -1.002, 0.996, 2.994, 3.0), y=2.993999719619751,
             x=1.4997701, ladj=6.569, sign=-1.0)


def c01_params(sign, dtype):
    """The case's parameters in nflows' terms, in ours: widths (0,0,0,0), heights
    (0,0,0,+-20), derivatives (0, 20, -20). nflows' slope is 1e-3 + softplus(u); ours
    is 1e-3 + softplus(u + shift) (so that u = 0 gives slope 1), hence u - shift."""
    shift = math.log(math.expm1(1.0 - 1e-3))
    p = torch.zeros(1, 11, dtype=dtype)
    p[0, 7] = 20 * sign
    p[0, 8:] = torch.tensor([0.0, 20.0, -20.0], dtype=dtype) - shift
    return knots(p, bins=4)


def _fwd64(x, xk, yk, dk):
    """The spline evaluated in float64 on the (float32) knots: the exact-input reference."""
    y, lad = rqs(x.double().reshape(1), xk.double(), yk.double(), dk.double())
    return y[0].item(), lad[0].item()


@pytest.mark.parametrize("case", [C01_A, C01_B], ids=["A", "B"])
def test_c01_float64_reference_values(case):
    """C01 reference: with the knots built from the case's parameters (float64) the inverse
    gives the case's x and log-det (x in the bin [0, 1.5])."""
    xk, yk, dk = c01_params(case["sign"], F64)
    assert torch.allclose(yk[0], torch.tensor(case["yk"], dtype=F64), atol=1e-7)
    assert torch.allclose(dk[0], torch.tensor(C01_DK, dtype=F64), atol=1e-6)
    x, ladj = rqs(torch.tensor([case["y"]], dtype=F64), xk, yk, dk, inverse=True)
    assert 0.0 <= x.item() <= 1.5
    assert abs(x.item() - case["x"]) < 1e-6
    assert abs(ladj.item() - case["ladj"]) < 1e-3
    # the log-det is the forward's, negated, at the returned point
    assert abs(ladj.item() + _fwd64(x, xk, yk, dk)[1]) < 1e-9


def _check_float32_inverse(x, ladj, y, xk, yk, dk, case):
    """What a correct float32 inverse must satisfy at this ill-conditioned point:
    finite; in the bin [0, 1.5] where y lies; within the case's 2e-3 of the reference x;
    backward stable (forward(x), evaluated exactly, is within 2 ulp of y); and the
    returned log-det is the exact one at the returned x."""
    assert torch.isfinite(x).all() and torch.isfinite(ladj).all()
    xv = x.item()
    assert 0.0 <= xv <= 1.5
    assert abs(xv - case["x"]) < 2e-3
    y_back, lad_fwd = _fwd64(x, xk, yk, dk)
    ulp = (torch.nextafter(y, torch.tensor(math.inf)) - y).abs().item()
    assert abs(y_back - y.item()) <= 2 * ulp
    assert abs(ladj.item() + lad_fwd) < 1e-4


@pytest.mark.parametrize("case", [C01_A, C01_B], ids=["A", "B"])
def test_c01_explicit_knots_float32(case):
    """C01 spec: explicit knots, float32; inverse at the query must not raise, finite x in
    [0, 1.5] with |x - x_ref| < 2e-3, finite ladj.

    The case's |ladj - 8.283| < 1 for A cannot hold here: float32(-2.982) *is* the query
    -2.9820001125335693, so y sits exactly on the knot, x = 1.5 and the exact inverse
    log-det is -log(0.001000002) = 6.9078 (8.283 belongs to the float64 knot
    -2.98199996, see test_c01_float64_reference_values). The log-det is ill-conditioned
    there: it moves from 6.9 to 8.3 (and on to 10.0) within one ulp of y."""
    xk = torch.tensor([C01_XK], dtype=F32)
    yk = torch.tensor([case["yk"]], dtype=F32)
    dk = torch.tensor([C01_DK], dtype=F32)
    y = torch.tensor([case["y"]], dtype=F32)
    x, ladj = rqs(y, xk, yk, dk, inverse=True)
    _check_float32_inverse(x, ladj, y, xk, yk, dk, case)
    if case is C01_A:
        assert y.item() == yk[0, 3].item()  # the query is the knot itself in float32
        assert x.item() == 1.5 and abs(ladj.item() + math.log(dk[0, 3].item())) < 1e-6
    else:
        assert abs(ladj.item() - case["ladj"]) < 1  # the case's tolerance holds for B


@pytest.mark.parametrize("case", [C01_A, C01_B], ids=["A", "B"])
def test_c01_parameter_knots_float32(case):
    """C01 from the case's unnormalised parameters in float32: the same guarantees, and
    finite gradients of x and ladj with respect to the parameters (flowjax #239)."""
    xk, yk, dk = c01_params(case["sign"], F32)
    y = torch.tensor([case["y"]], dtype=F32)
    x, ladj = rqs(y, xk, yk, dk, inverse=True)
    _check_float32_inverse(x, ladj, y, xk, yk, dk, case)

    shift = math.log(math.expm1(1.0 - 1e-3))
    p = torch.zeros(1, 11)
    p[0, 7] = 20 * case["sign"]
    p[0, 8:] = torch.tensor([0.0, 20.0, -20.0]) - shift
    p.requires_grad_(True)
    x, ladj = rqs(y, *knots(p, bins=4), inverse=True)
    (x.sum() + ladj.sum()).backward()
    assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("case", [C01_A, C01_B], ids=["A", "B"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_c01_dense_sweep_of_the_case_splines(case, dtype):
    """C01: inverting all 60 001 forward outputs of x = linspace(-3, 3, 60001) gives no
    non-finite value, and each x lands in the bin where its y was located."""
    xk = torch.tensor([C01_XK], dtype=dtype)
    yk = torch.tensor([case["yk"]], dtype=dtype)
    dk = torch.tensor([C01_DK], dtype=dtype)
    x = torch.linspace(-3, 3, 60001, dtype=dtype)
    y, lf = rqs(x, xk, yk, dk)
    xr, li = rqs(y, xk, yk, dk, inverse=True)
    assert torch.isfinite(xr).all() and torch.isfinite(li).all()
    _assert_in_bin(xr, y, xk, yk)
    # backward stable: forward(inverse(y)), evaluated exactly, is within a few ulps of y
    # (x itself is ill-conditioned: in spline A's first bin the slope drops to ~1e-6)
    eps = torch.finfo(dtype).eps
    y_back, slope_log = rqs(xr.double(), *[t.double() for t in (xk, yk, dk)])
    assert ((y_back - y.double()).abs() <= 32 * 3 * eps * (1 + slope_log.exp())).all()


def _assert_in_bin(xr, y, xk, yk):
    K = xk.shape[-1] - 1
    inside = (y >= yk[0, 0]) & (y <= yk[0, K])
    b = torch.searchsorted(yk[0, 1:K].contiguous(), y[:, None], right=True)[:, 0]
    lo, hi = xk[0, b], xk[0, b + 1]
    bad = inside & ((xr < lo) | (xr > hi))
    assert not bad.any(), f"{int(bad.sum())} inverses outside their bin"


def _c01_draws(n_draws, max_scale, seed):
    g = torch.Generator().manual_seed(seed)
    for i in range(n_draws):
        K = (4, 8)[i % 2]
        scale = max_scale if i < n_draws // 5 else max_scale * torch.rand((), generator=g).item()
        yield K, scale * torch.randn(1, 3 * K - 1, generator=g)


def test_c01_property_sweep_float32():
    """C01 property test: 50 random parameter draws (unnormalised scale up to 20,
    K in {4, 8}), x = linspace(-3, 3, 60001), float32.

    * no exception, no NaN/Inf, every inverse inside the bin where y was located;
    * backward stability: |forward(inverse(y)) - y| <= 32 eps B (1 + slope), forward
      evaluated exactly (float64) at the float32 result, B = 3 (measured max 12.5;
      the cancelling root formula used before the fix gave 8745);
    * the case's |ladj_fwd(x) + ladj_inv(y)| < 1e-3 where the forward slope >= 1e-2 and
      the problem is well conditioned in float32: excluded are points where even the
      exact inverse of the (rounded) float32 y misses by > 1e-4 (the forward rounded y
      onto a knot of a bin whose slope rises from 1e-3 to 0.16 within 4.8e-7), or where
      the exact inverse log-det moves by > 2.5e-5 within one ulp of y. At least 90% of
      the slope >= 1e-2 points remain (measured 94.9%).
    """
    x = torch.linspace(-3, 3, 60001)
    inf = torch.tensor(math.inf)
    n_slope = n_kept = 0
    worst_backward = 0.0
    for K, p in _c01_draws(50, 20.0, seed=0):
        xk, yk, dk = knots(p, bins=K)
        y, lf = rqs(x, xk, yk, dk)
        xr, li = rqs(y, xk, yk, dk, inverse=True)
        assert torch.isfinite(y).all() and torch.isfinite(lf).all()
        assert torch.isfinite(xr).all() and torch.isfinite(li).all()
        _assert_in_bin(xr, y, xk, yk)

        k64 = [t.double() for t in (xk, yk, dk)]
        y_back, slope_log = rqs(xr.double(), *k64)
        bound = 3 * EPS32 * (1 + slope_log.exp())
        backward = ((y_back - y.double()).abs() / bound).max().item()
        worst_backward = max(worst_backward, backward)

        xr64, li64 = rqs(y.double(), *k64, inverse=True)
        _, lu = rqs(torch.nextafter(y, inf).double(), *k64, inverse=True)
        _, ld = rqs(torch.nextafter(y, -inf).double(), *k64, inverse=True)
        _, lf64 = rqs(x.double(), *k64)
        sens = torch.maximum((lu - li64).abs(), (ld - li64).abs())
        steep = lf >= math.log(1e-2)
        kept = steep & (sens < 2.5e-5) & ((lf64 + li64).abs() < 1e-4)
        n_slope += int(steep.sum())
        n_kept += int(kept.sum())
        err = (lf + li)[kept].abs()
        assert err.max().item() < 1e-3, (K, err.max().item())
    assert worst_backward <= 32, worst_backward
    assert n_kept >= 0.9 * n_slope, (n_kept, n_slope)


def test_c01_extreme_parameters_stay_finite():
    """Unnormalised parameters of scale 100 (zuko gave NaN inverses in 15 of 80 such
    trials): still no NaN/Inf and every inverse in its bin, float32."""
    x = torch.linspace(-3, 3, 20001)
    for K, p in _c01_draws(20, 100.0, seed=7):
        xk, yk, dk = knots(p, bins=K)
        y, lf = rqs(x, xk, yk, dk)
        xr, li = rqs(y, xk, yk, dk, inverse=True)
        assert torch.isfinite(xr).all() and torch.isfinite(li).all() and torch.isfinite(lf).all()
        _assert_in_bin(xr, y, xk, yk)


# ------------------------------------------------------------------------------- C02
H = (16, 16)


def _c02_layers(context):
    """Every spline layer that exists, D = 2, tail bound 3 (a new spline layer is one
    line here)."""
    c = context
    return {
        "coupling": lambda: Coupling(RQSpline(8, tail_bound=3), mask=[False, True],
                                     context_features=c, hidden_features=H),
        "coupling-flip": lambda: Coupling(RQSpline(5, tail_bound=3), mask=[True, False],
                                          context_features=c, hidden_features=H),
        "coupling-mixed-domains": lambda: Coupling(
            RQSpline(8, tail_bound=3), mask=[False, True], domains=[circle, real],
            context_features=c, hidden_features=H),
        "inverse-coupling": lambda: Inverse(Coupling(RQSpline(8, tail_bound=3), mask=[False, True],
                                                     context_features=c, hidden_features=H)),
        "chain": lambda: _chain2(c),
        "inverse-chain": lambda: Inverse(_chain2(c)),
        "autoregressive": lambda: MaskedAutoregressive(RQSpline(8, tail_bound=3), features=2,
                                                       context_features=c, hidden_features=H),
        "autoregressive-reversed": lambda: MaskedAutoregressive(
            RQSpline(6, tail_bound=3), features=2, order=[2, 1], context_features=c,
            hidden_features=H),
        "inverse-autoregressive": lambda: Inverse(MaskedAutoregressive(
            RQSpline(8, tail_bound=3), features=2, context_features=c, hidden_features=H)),
    }


C02_CASES = [(name, c) for c in (None, 4) for name in _c02_layers(c)]
C02_IDS = [f"{n}-{'ctx' if c else 'noctx'}" for n, c in C02_CASES]


def _c02_build(name, context, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        t = _c02_layers(context)[name]()
    jitter_(t, 0.5, g)
    return t.to(dtype)


def _ctx(context, n, dtype):
    return None if context is None else torch.randn(n, context, dtype=dtype)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("name,context", C02_CASES, ids=C02_IDS)
def test_c02_all_tail_batch_is_identity(name, context, dtype):
    """C02: forward and inverse of a batch entirely outside [-3, 3] return it bit-exactly
    with ladj exactly 0 (the conditioning coordinate may be anything)."""
    t = _c02_build(name, context, dtype)
    x = torch.tensor([[5.0, -6.0], [7.0, 8.0], [-1e4, 1e4]], dtype=dtype)
    if name == "coupling-mixed-domains":
        x[:, 0] = torch.tensor([0.5, -2.0, 3.0])  # the conditioning angle, inside [-pi, pi)
    c = _ctx(context, 3, dtype)
    for f in (t.forward, t.inverse):
        y, ladj = f(x, c)
        assert torch.equal(y, x)
        assert torch.equal(ladj, torch.zeros(3, dtype=dtype))


def _spline_flow(context, dtype, kind="coupling", seed=0):
    """A flow made only of spline layers over N(0, I): two couplings, or two AR layers."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        if kind == "coupling":
            t = _chain2(context)
        else:
            t = Chain([MaskedAutoregressive(RQSpline(8, tail_bound=3), features=2, order=o,
                                            context_features=context, hidden_features=H)
                       for o in ("sequential", "reversed")])
    jitter_(t, 0.5, g)
    return normflux.Flow(t, normflux.DiagGaussian(2)).to(dtype)


def _chain2(context):
    return Chain([Coupling(RQSpline(8, tail_bound=3), mask=[False, True], context_features=context,
                        hidden_features=H),
               Coupling(RQSpline(8, tail_bound=3), mask=[True, False], context_features=context,
                        hidden_features=H)])


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("context", [None, 4])
def test_c02_far_tail_log_prob_is_base_log_prob(context, dtype, kind):
    flow = _spline_flow(context, dtype, kind)
    x = torch.tensor([[1e4, -1e4], [-1e4, 1e4]], dtype=dtype)
    lp = flow.log_prob(x, _ctx(context, 2, dtype))
    expected = torch.full((2,), -1e8 - math.log(2 * math.pi), dtype=dtype)
    assert torch.allclose(lp, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind", ["coupling", "autoregressive"])
@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("context", [None, 4])
def test_c02_edges_finite_and_mixed_batch_gradients_finite(context, dtype, kind):
    flow = _spline_flow(context, dtype, kind)
    edge = torch.tensor([[3.0, -3.0], [3.0000002, -3.0000002], [2.9999998, 0.0]], dtype=dtype)
    assert torch.isfinite(flow.log_prob(edge, _ctx(context, 3, dtype))).all()
    mixed = torch.tensor([[0.5, -0.5], [4.0, 1.0], [-50.0, 60.0], [2.9, -2.9]], dtype=dtype)
    loss = -flow.log_prob(mixed, _ctx(context, 4, dtype)).mean()
    loss.backward()
    grads = [p.grad for p in flow.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0  # the in-bound rows do train the layer


@pytest.mark.parametrize("name,context", C02_CASES, ids=C02_IDS)
def test_c02_tails_are_continuous_at_the_bound(name, context):
    """Linear tails join the spline with value and slope: within h = 1e-11 of +-3 the
    layer is the identity to O(h) and ladj is 0 to O(h) (float64; the rate can be ~1e5
    per unit when the last bin is one of width 6e-3 with slopes far from 1)."""
    t = _c02_build(name, context, F64)
    h = 1e-11
    # every coordinate at the bound: then each layer of a chain sees its transformed
    # coordinate there too (an angle of +-(3 -+ h) is valid for the circular one)
    x = torch.tensor([[3 - h, 3 - h], [-3 + h, -3 + h], [3 - h, -3 - h], [-3 - h, 3 + h]],
                     dtype=F64)
    c = _ctx(context, 4, F64)
    y, ladj = t(x, c)
    assert (y - x).abs().max() < 1e-9
    assert ladj.abs().max() < 1e-5


# ------------------------------------------------------------------------------- C16
PI = math.pi


def _c16_layers():
    """Circular spline layers, tail bound pi, float64, parameters jittered 0.5 N(0,1),
    seed 3. 'circ': coordinate 1 circular and transformed, conditioned on real 0;
    'real-on-circ': real 0 transformed, conditioned on circular 1; 'mixed': one layer
    transforming a circular (1) and a linear-tail (2) coordinate; 'chain': all three
    kinds around CircularShifts."""
    g = torch.Generator().manual_seed(3)
    with seeded(3):
        return _c16_build(g)


def _c16_build(g):
    mk = {
        "circ": lambda: Coupling(RQSpline(8, tail_bound=PI), mask=[False, True],
                                 domains=[real, circle], hidden_features=H),
        "real-on-circ": lambda: Coupling(RQSpline(8, tail_bound=PI), mask=[True, False],
                                         domains=[real, circle], hidden_features=H),
        "mixed": lambda: Coupling(RQSpline(8, tail_bound=PI), mask=[False, True, True],
                                  domains=[real, circle, real], hidden_features=H),
        "mixed-ctx": lambda: Coupling(RQSpline(6, tail_bound=PI), mask=[False, True, True],
                                      domains=[real, circle, real], context_features=4,
                                      hidden_features=H),
    }
    out = {k: jitter_(f(), 0.5, g).double() for k, f in mk.items()}
    chain = Chain([mk["circ"](), CircularShift([real, circle], shift=1.0), mk["real-on-circ"](),
                   CircularShift([real, circle], shift=2.5), mk["circ"]()])
    out["chain"] = jitter_(chain, 0.5, g).double()
    return out


C16 = _c16_layers()
C16_CIRC_COL = 1


def _c16_points(name, xc, xr=None):
    """Rows (other, x_c[, linear]) with other in linspace(-3, 3, 7)."""
    other = torch.linspace(-3, 3, 7, dtype=F64)
    if name.startswith("mixed"):
        lin = other.flip(0) if xr is None else torch.full((7,), xr, dtype=F64)
        return torch.stack([other, torch.full((7,), xc, dtype=F64), lin], 1)
    return torch.stack([other, torch.full((7,), xc, dtype=F64)], 1)


def _c16_ctx(name, n=7):
    return torch.randn(n, 4, dtype=F64, generator=torch.Generator().manual_seed(9)) \
        if name.endswith("ctx") else None


def _same_mod_2pi(a, b, circ_cols, tol):
    d = a - b
    d[:, circ_cols] = wrap_angle(d[:, circ_cols])
    return d.abs().max().item() < tol


@pytest.mark.parametrize("name", list(C16))
def test_c16_a_minus_pi_is_pi(name):
    """(a) x_c = -pi and x_c = pi are the same point: outputs equal mod 2 pi, equal ladj."""
    t = C16[name]
    c = _c16_ctx(name)
    za, la = t(_c16_points(name, -PI), c)
    zb, lb = t(_c16_points(name, PI), c)
    assert _same_mod_2pi(za, zb, [C16_CIRC_COL], 1e-9)
    assert (la - lb).abs().max() < 1e-9
    assert la.abs().max() > 1e-3  # a non-trivial layer


@pytest.mark.parametrize("name", list(C16))
@pytest.mark.parametrize("turns", [1, -1, 3])
def test_c16_b_inputs_are_wrapped(name, turns):
    """(b) f(x_c + 2 pi k) = f(x_c) mod 2 pi (inputs outside [-pi, pi) are wrapped)."""
    t = C16[name]
    c = _c16_ctx(name)
    za, la = t(_c16_points(name, 0.5), c)
    zb, lb = t(_c16_points(name, 0.5 + 2 * PI * turns), c)
    assert _same_mod_2pi(za, zb, [C16_CIRC_COL], 1e-9)
    assert (la - lb).abs().max() < 1e-9


@pytest.mark.parametrize("name", ["real-on-circ", "mixed", "mixed-ctx"])
@pytest.mark.parametrize("value", [10.0, -10.0])
def test_c16_c_linear_coordinate_outside_bound_is_unchanged(name, value):
    """(c) the linear-tail coordinate at +-10 passes unchanged with zero ladj contribution
    (its Jacobian row is the unit vector), and (0.5, 10) / (0.5, -10) stay distinct."""
    t = C16[name]
    lin = 0 if name == "real-on-circ" else 2
    c = _c16_ctx(name)
    if name == "real-on-circ":
        x = torch.stack([torch.full((7,), value, dtype=F64), torch.linspace(-3, 3, 7, dtype=F64)], 1)
    else:
        x = _c16_points(name, 0.5, xr=value)
    z, ladj = t(x, c)
    assert torch.equal(z[:, lin], x[:, lin])
    if name == "real-on-circ":
        assert torch.equal(ladj, torch.zeros(7, dtype=F64))
    for i in range(7):
        ci = None if c is None else c[i:i + 1]
        J = torch.autograd.functional.jacobian(lambda v: t(v[None], ci)[0][0], x[i])
        e = torch.zeros(x.shape[1], dtype=F64)
        e[lin] = 1
        assert torch.equal(J[lin], e)
    ref = jacobian_logdet(t.forward, x, c)
    assert (ladj - ref).abs().max() < 1e-9
    # invertible: +10 and -10 do not collide
    zp, _ = t(_c16_points(name, 0.5, xr=10.0) if lin == 2 else x.abs(), c)
    zm, _ = t(_c16_points(name, 0.5, xr=-10.0) if lin == 2 else -x.abs(), c)
    assert (zp - zm).abs().max() > 1.0


@pytest.mark.parametrize("name", [n for n in C16 if n != "chain"])
def test_c16_d_round_trip(name):
    """(d) round trip to 1e-9 for every circular spline layer (float64), with the linear
    coordinate of the mixed layers at +-10, and the angle near -pi, pi and inside."""
    t = C16[name]
    c = _c16_ctx(name, 7 * 4)
    rows = [_c16_points(name, v) for v in (-PI, 0.5, PI - 1e-12, 2.0)]
    x = torch.cat(rows)
    if name.startswith("mixed"):
        x[::3, 2] = 10.0
        x[1::3, 2] = -10.0
    z, lf = t(x, c)
    xr, li = t.inverse(z, c)
    x_wrapped = x.clone()
    x_wrapped[:, 1] = wrap_angle(x[:, 1])
    assert _same_mod_2pi(xr, x_wrapped, [1], 1e-9)
    # both log-dets by autograd (|lf + li| itself is conditioning-limited: slopes ~1e-5)
    assert (lf - jacobian_logdet(t.forward, x, c)).abs().max() < 1e-8
    assert (li - jacobian_logdet(t.inverse, z.detach(), c)).abs().max() < 1e-8
    assert (z[:, 1] >= -PI).all() and (z[:, 1] < PI).all()


def test_c16_d_chain_backward_error():
    """The chain: forward(inverse(z)) = z to rounding (1e-12). Its x round trip is only
    conditioning-limited (slopes ~1e-4 of its first layer amplify the 1e-14 errors of the
    later layers), so it is held to the Jacobian bound like the sharp harness test."""
    t = C16["chain"]
    x = torch.cat([_c16_points("chain", v) for v in (-PI, 0.5, PI - 1e-12, 2.0)])
    z, _ = t(x)
    xr, _ = t.inverse(z)
    zr, _ = t(xr)
    assert _same_mod_2pi(zr, z, [1], 1e-12)
    sigma = min(torch.linalg.svdvals(torch.autograd.functional.jacobian(
        lambda v: t(v[None])[0][0], xi)).min().item() for xi in x)
    assert _same_mod_2pi(xr, x, [1], 64 * 2.2e-16 * 4 / sigma)


def test_c16_e_torus_density_integrates_to_one():
    """(e) a flow of circular spline layers over the uniform base on the torus: the density
    integrates to 1 (Riemann = trapezoid sum of a periodic function, 256 x 256).

    Parameters jittered 0.3 N(0, 1): the density still ranges over 0.016..27 times the
    uniform one. With the 0.5 jitter of (a)-(d) the density has continuous ridges with
    slopes ~1e5 that 256 points per axis do not resolve (the sum was 1.025 at 256^2,
    1.0047 at 512^2, 1.0000 at 2048^2: quadrature error, not normalisation)."""
    g = torch.Generator().manual_seed(3)
    with seeded(3):
        t = Chain([Coupling(RQSpline(8), mask=[False, True], domains=circle, hidden_features=H),
                   CircularShift([circle, circle], shift=1.0),
                   Coupling(RQSpline(8), mask=[True, False], domains=circle, hidden_features=H),
                   CircularShift([circle, circle], shift=2.0),
                   Coupling(RQSpline(6), mask=[False, True], domains=circle, hidden_features=H)])
    jitter_(t, 0.3, g)
    flow = normflux.Flow(t, normflux.CircularUniform(2)).double()
    n = 256
    h = 2 * PI / n
    a = -PI + h * torch.arange(n, dtype=F64)
    grid = torch.cartesian_prod(a, a)
    with torch.no_grad():
        lp = flow.log_prob(grid)
    integral = (lp.exp().sum() * h * h).item()
    assert abs(integral - 1) < 1e-3, integral
    # and the density is far from uniform, so the check has teeth
    assert lp.exp().max().item() > 10 / (4 * PI * PI)
    assert lp.exp().min().item() < 0.1 / (4 * PI * PI)


def test_c16_circular_spline_keeps_the_fixed_point():
    """A circular spline maps -pi to -pi (its fixed point) and [-pi, pi) onto itself."""
    t = C16["circ"]
    x = torch.stack([torch.linspace(-3, 3, 7, dtype=F64), torch.full((7,), -PI, dtype=F64)], 1)
    z, _ = t(x)
    assert torch.allclose(z[:, 1], torch.full((7,), -PI, dtype=F64), atol=1e-12)
    xs = torch.stack([torch.zeros(1001, dtype=F64), torch.linspace(-PI, PI - 1e-9, 1001, dtype=F64)], 1)
    zs, _ = t(xs)
    assert (zs[:, 1].diff() > 0).all()  # monotone on the fundamental interval


@pytest.mark.parametrize("domain", [real, circle])
def test_single_bin_spline_layer(domain):
    """bins = 1 is allowed by RQSpline: one rational-quadratic bin over the whole box
    (the knot code once returned empty knots for K = 1)."""
    from normflux.testing import check_transform
    with seeded(0):
        t = Coupling(RQSpline(1, tail_bound=2.0), mask="alternating", features=4, domains=domain,
                     hidden_features=H)
    jitter_(t, 0.3, torch.Generator().manual_seed(0))
    t = t.double()
    g = torch.Generator().manual_seed(1)
    x = (2 * torch.rand(6, 4, generator=g, dtype=F64) - 1) * 3
    assert check_transform(t, x).ok
    if domain == circle:  # circle: boundary slopes free (shared), so not the identity
        assert t(x)[1].abs().max() > 1e-3
