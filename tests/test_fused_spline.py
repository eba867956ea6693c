"""The fused spline equals the reference knots + spline to every derivative order.

Every test runs on both fused implementations: the C kernel (``native``, where it builds)
and the tensor-op Function (``torch``, what runs without a C compiler, on other devices
and under ``torch.compile`` when the kernel's custom operator is unavailable).
"""

import pytest
import torch
from torch.func import hessian, jacrev, vmap

from normflux.transforms import native_spline
from normflux.transforms.fused_spline import _reference, fused_rq_spline


@pytest.fixture(autouse=True, params=["native", "torch"])
def backend(request, monkeypatch):
    if request.param == "native":
        if not native_spline.available():
            pytest.skip("the spline's C kernel did not build here")
    else:
        monkeypatch.setattr(native_spline, "available", lambda: False)
    return request.param


def _setup(K, B=6, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = (2 * torch.randn(B, n, 3 * K - 1, generator=g, dtype=torch.float64)).requires_grad_()
    x = (8 * torch.rand(B, n, generator=g, dtype=torch.float64) - 4).requires_grad_()
    low = torch.full((n,), -3.0, dtype=torch.float64)
    return x, p, low, -low


@pytest.mark.parametrize("K", [1, 2, 5, 8])
@pytest.mark.parametrize("inverse", [False, True])
def test_values_and_gradients_match_reference(K, inverse):
    x, p, low, high = _setup(K)
    y1, l1 = fused_rq_spline(x, p, low, high, bins=K, inverse=inverse)
    y2, l2 = _reference(x, p, low, high, K, 1e-3, 1e-3, 1e-3, inverse)
    assert (y1 - y2).abs().max() < 1e-12 and (l1 - l2).abs().max() < 1e-12
    gy, gl = torch.randn_like(y1), torch.randn_like(l1)
    a = torch.autograd.grad((y1, l1), (x, p), (gy, gl))
    b = torch.autograd.grad((y2, l2), (x, p), (gy, gl))
    assert all((u - v).abs().max() < 1e-11 for u, v in zip(a, b))
    f = lambda x, p: fused_rq_spline(x, p, low, high, bins=K, inverse=inverse)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, p))
    assert torch.autograd.gradgradcheck(f, (x, p))


def test_torch_func_hessians_are_exact():
    K = 5
    x, p, low, high = _setup(K, B=1, n=2)
    x, p = x.detach(), p.detach()

    def fused(pp):
        return sum(t.sum() for t in fused_rq_spline(x, pp, low, high, bins=K))

    def ref(pp):
        return sum(t.sum() for t in _reference(x, pp, low, high, K, 1e-3, 1e-3, 1e-3, False))

    h = jacrev(jacrev(ref))(p)
    assert h.abs().max() > 1e-3
    assert (jacrev(jacrev(fused))(p) - h).abs().max() < 1e-10
    assert (hessian(fused)(p) - h).abs().max() < 1e-10
    J = vmap(jacrev(lambda v, q: fused_rq_spline(v, q, low, high, bins=K)[0]))(x, p)
    assert J.shape == (1, 2, 2)


def test_far_tails_identity_and_finite_gradients():
    K = 8
    _, p, low, high = _setup(K, B=3, n=2)
    x = torch.tensor([[5.0, -6.0], [1e4, -1e4], [0.5, 3.0]], dtype=torch.float64,
                     requires_grad=True)
    y, lad = fused_rq_spline(x, p, low, high, bins=K)
    assert torch.equal(y[:2], x[:2]) and torch.equal(lad[:2], torch.zeros_like(lad[:2]))
    (y.sum() + lad.sum()).backward()
    assert torch.isfinite(p.grad).all() and torch.isfinite(x.grad).all()
    assert torch.equal(p.grad[:2], torch.zeros_like(p.grad[:2]))


@pytest.mark.parametrize("inverse", [False, True])
def test_forward_mode_ad_matches_finite_differences(inverse):
    from normflux.transforms.splines import rational_quadratic_spline, spline_knots
    K = 6
    x, p, low, high = _setup(K)

    def f(x, p):
        return rational_quadratic_spline(x, *spline_knots(p, low, high, bins=K), inverse=inverse)

    assert torch.autograd.gradcheck(f, (x, p), check_forward_ad=True, check_backward_ad=True)


def test_c01_sweep_through_the_fused_path_float32():
    """C01's property on the fused path: no NaN/Inf over a dense float32 sweep with sharp
    parameters (scale up to 20), outputs in range, and the inverse backward stable: the
    exact (float64) forward map at the float32 inverse is within 32 * 3 eps (1 + slope) of
    y, the bound test_splines.py derives for the reference path (ladj cancellation itself
    is ill-conditioned near knots in float32; see test_c01_property_sweep_float32)."""
    g = torch.Generator().manual_seed(0)
    x = torch.linspace(-3, 3, 60001)[:, None]
    low, high = torch.tensor([-3.0]), torch.tensor([3.0])
    for trial in range(20):
        K = 4 if trial % 2 else 8
        scale = 20.0 * (trial + 1) / 20
        p = (scale * torch.randn(1, 1, 3 * K - 1, generator=g)).expand(60001, 1, 3 * K - 1)
        y, lf = fused_rq_spline(x, p, low, high, bins=K)
        xr, li = fused_rq_spline(y, p, low, high, bins=K, inverse=True)
        assert torch.isfinite(y).all() and torch.isfinite(xr).all() and torch.isfinite(li).all()
        assert (y.abs() <= 3).all() and (xr.abs() <= 3).all()
        y64, lf64 = _reference(xr.double(), p.double(), low.double(), high.double(), K,
                               1e-3, 1e-3, 1e-3, False)
        eps = torch.finfo(torch.float32).eps
        assert ((y64 - y.double()).abs() <= 32 * 3 * eps * (1 + lf64.exp())).all()


@pytest.mark.parametrize("inverse", [False, True])
def test_batch_minor_parameters_take_the_transposed_path_exactly(inverse):
    """A conditioner's transposed output (memory (n, P, B), what MLP/MADE give with
    ``transposed_output=True``) is read in place; values and gradients, both with respect
    to the input and the parameters, match the contiguous layout and the reference."""
    K, B, n = 6, 7, 3
    x, p, low, high = _setup(K, B=B, n=n, seed=3)
    pt = p.detach().permute(1, 2, 0).contiguous().permute(2, 0, 1).requires_grad_()
    assert pt.stride(0) == 1 and pt.stride(2) == B and torch.equal(pt, p)
    y1, l1 = fused_rq_spline(x, pt, low, high, bins=K, inverse=inverse)
    y2, l2 = fused_rq_spline(x, p, low, high, bins=K, inverse=inverse)
    y3, l3 = _reference(x, p, low, high, K, 1e-3, 1e-3, 1e-3, inverse)
    # equal to rounding (the vectorised inner loops differ with the inner axis' length)
    for u, v in ((y1, y2), (l1, l2), (y1, y3), (l1, l3)):
        assert (u - v).abs().max() < 1e-12
    gy, gl = torch.randn_like(y1), torch.randn_like(l1)
    a = torch.autograd.grad((y1, l1), (x, pt), (gy, gl))
    b = torch.autograd.grad((y3, l3), (x, p), (gy, gl))
    assert a[1].stride() == pt.stride()  # no copy into another layout
    assert all((u - v).abs().max() < 1e-11 for u, v in zip(a, b))


def test_learnable_box_and_mixed_dtypes_take_the_reference():
    """A box that requires grad gets its gradients (the reference's), and mixed dtypes
    promote as in the reference instead of failing in the backward."""
    K = 5
    x, p, low, high = _setup(K, B=4, n=3, seed=5)
    lo, hi = low.clone().requires_grad_(), high.clone().requires_grad_()
    y, lad = fused_rq_spline(x, p, lo, hi, bins=K)
    lo_r, hi_r = low.clone().requires_grad_(), high.clone().requires_grad_()
    yr, lr = _reference(x, p, lo_r, hi_r, K, 1e-3, 1e-3, 1e-3, False)
    g = torch.autograd.grad((y + lad).sum(), (lo, hi))
    gr = torch.autograd.grad((yr + lr).sum(), (lo_r, hi_r))
    assert all(v.abs().max() > 0 and (v - w).abs().max() < 1e-12 for v, w in zip(g, gr))
    x32 = x.detach().float().requires_grad_()
    y32, _ = fused_rq_spline(x32, p, low, high, bins=K)
    assert y32.dtype == torch.float64
    (gx,) = torch.autograd.grad(y32.sum(), x32)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()


def test_scalar_box_and_shape_errors():
    K = 4
    x, p, low, high = _setup(K, B=5, n=2, seed=6)
    pt = p.detach().permute(1, 2, 0).contiguous().permute(2, 0, 1)
    for params in (p.detach(), pt):
        for lo, hi in ((-3.0, 3.0), (torch.tensor(-3.0, dtype=torch.float64),
                                     torch.tensor(3.0, dtype=torch.float64))):
            y, lad = fused_rq_spline(x.detach(), params, lo, hi, bins=K)
            y2, l2 = fused_rq_spline(x.detach(), params, low, high, bins=K)
            assert torch.equal(y, y2) and torch.equal(lad, l2)
    with pytest.raises(ValueError, match=r"do not match inputs of shape \(5, 2\)"):
        fused_rq_spline(x, p[:1], low, high, bins=K)


@pytest.mark.parametrize("inverse", [False, True])
def test_forward_mode_ad_through_the_fused_entry(inverse):
    """Forward-mode AD (no jvp in the Function) is routed to the reference."""
    import torch.autograd.forward_ad as fwAD
    K = 6
    x, p, low, high = _setup(K, B=3, n=2, seed=7)
    x, p = x.detach(), p.detach()
    t = torch.randn_like(x)
    with fwAD.dual_level():
        y, lad = fused_rq_spline(fwAD.make_dual(x, t), p, low, high, bins=K, inverse=inverse)
        ty = fwAD.unpack_dual(y).tangent
    J = torch.autograd.functional.jacobian(
        lambda v: fused_rq_spline(v, p, low, high, bins=K, inverse=inverse)[0], x)
    assert (ty - torch.einsum("bnck,ck->bn", J, t)).abs().max() < 1e-10


def test_compiled_fullgraph_backward_matches_eager():
    """torch.compile(fullgraph=True) of a differentiated pass traces the fused backward
    (the tensor-op Function, or the kernel's custom operator) without a graph break."""
    K = 5
    x, p, low, high = _setup(K, B=4, n=2, seed=8)
    f = lambda x, p: sum(t.sum() for t in fused_rq_spline(x, p, low, high, bins=K))  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    a = torch.autograd.grad(compiled(x, p), (x, p))
    b = torch.autograd.grad(f(x, p), (x, p))
    assert all((u - v).abs().max() < 1e-12 for u, v in zip(a, b))


@pytest.mark.parametrize("md", [1.0, 1.5, -0.1])
def test_min_derivative_outside_its_range_is_named(md):
    x, p = torch.zeros(2, 3), torch.zeros(2, 3, 23)
    with pytest.raises(ValueError, match="min_derivative must be in"):
        fused_rq_spline(x, p, -torch.ones(3), torch.ones(3), bins=8, min_derivative=md)


@pytest.mark.parametrize("kw,match", [(dict(min_derivative=1.0), "min_derivative"),
                                      (dict(min_bin_width=0.2), "min_bin_width"),
                                      (dict(min_bin_height=-1e-3), "min_bin_width")])
def test_rq_spline_rejects_floors_outside_their_range(kw, match):
    import normflux
    with pytest.raises(ValueError, match=match):
        normflux.RQSpline(8, **kw)
    # the functional form too: a negative floor could make the knots decrease
    with pytest.raises(ValueError, match=match):
        fused_rq_spline(torch.zeros(2, 3), torch.zeros(2, 3, 23), -torch.ones(3), torch.ones(3),
                        bins=8, **kw)
