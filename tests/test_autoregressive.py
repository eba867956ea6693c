"""MADE and MaskedAutoregressive: the autoregressive property (C17), inverses, harness."""

import itertools

import pytest
import torch
from helpers import jitter_

import normflux as nf
from normflux.nets import MADE
from normflux.testing import check_transform


def _jitter(module, scale=0.3, seed=0):
    return jitter_(module, scale, torch.Generator().manual_seed(seed))


def _jacobian(t, x, c=None):
    return torch.autograd.functional.jacobian(
        lambda v: t(v[None], None if c is None else c[:1])[0][0], x)


ORDERS = ["sequential", "reversed", "random"]


@pytest.mark.parametrize("D,order,bij,ctx", [
    (D, o, b, c) for D, o, b, c in itertools.product(
        range(1, 9), ORDERS, ["affine", "spline"], [None, 3])])
def test_c17_jacobian_triangular_in_declared_order(D, order, bij, ctx):
    """C17: for D in 1..8, H in {1, D-1, 2D+1}: Jacobian exactly triangular in the MADE order."""
    torch.manual_seed(D)
    for H in sorted({1, max(D - 1, 1), 2 * D + 1}):
        b = nf.Affine() if bij == "affine" else nf.RQSpline(5)
        t = _jitter(nf.MaskedAutoregressive(b, features=D, hidden_features=(H, H), order=order,
                                            context_features=ctx), seed=D * 100 + H).double()
        x = torch.randn(D, dtype=torch.float64)
        c = torch.randn(1, 3, dtype=torch.float64) if ctx else None
        J = _jacobian(t, x, c)
        perm = torch.argsort(t.made.degrees)
        Jp = J[perm][:, perm]
        assert torch.all(Jp.triu(1) == 0), (D, H, order)
        # and the sequential inverse matches the analytic inverse
        xb = torch.randn(4, D, dtype=torch.float64)
        cb = c.expand(4, 3) if c is not None else None
        z, _ = t(xb, cb)
        xr, _ = t.inverse(z, cb)
        assert (xr - xb).abs().max() < 1e-6


def test_made_masks_for_tiny_hidden_and_d1():
    """Construction succeeds for H < D and D = 1; D = 1 outputs ignore the input."""
    m = MADE(1, 3, hidden_features=(1, 1))
    _jitter(m)
    a = m(torch.zeros(2, 1))
    b = m(torch.ones(2, 1) * 5)
    assert torch.equal(a, b)
    m = MADE(7, 2, hidden_features=(3, 3), order="random", generator=torch.Generator().manual_seed(0))
    assert sorted(m.degrees.tolist()) == list(range(1, 8))


def test_made_degrees_saved_and_loaded():
    """A random order is a buffer: a model built with another seed loads it (C08)."""
    a = nf.MaskedAutoregressive(nf.Affine(), features=5, order="random",
                                generator=torch.Generator().manual_seed(1))
    b = nf.MaskedAutoregressive(nf.Affine(), features=5, order="random",
                                generator=torch.Generator().manual_seed(2))
    _jitter(a)
    assert not torch.equal(a.made.degrees, b.made.degrees)
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(6, 5)
    za, la = a(x)
    zb, lb = b(x)
    assert torch.equal(za, zb) and torch.equal(la, lb)
    xa, _ = a.inverse(za)
    xb, _ = b.inverse(za)
    assert torch.allclose(xa, xb) and (xa - x).abs().max() < 1e-5


@pytest.mark.parametrize("domains", [
    None, [nf.real, nf.circle, nf.interval(-4.0, 4.0)], nf.circle])
@pytest.mark.parametrize("ctx", [None, 2])
def test_harness_masked_autoregressive(domains, ctx):
    # jitter 0.1: with 0.3 the residual MADE makes slopes ~2e-4 that compound along the
    # order (condition number ~1e6, float64 round trip ~5e-10): conditioning, not error
    torch.manual_seed(0)
    t = _jitter(nf.MaskedAutoregressive(nf.RQSpline(6), features=3, domains=domains,
                                        context_features=ctx, order="random",
                                        residual=True), 0.1).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    x[:, 1] = torch.rand(6, dtype=torch.float64) * 6 - 3
    if domains is nf.circle:
        x = torch.rand(6, 3, dtype=torch.float64) * 6 - 3
    c = torch.randn(6, ctx, dtype=torch.float64) if ctx else None
    check_transform(t, x, c)


def test_harness_maf_and_iaf():
    torch.manual_seed(1)
    maf = _jitter(nf.MaskedAutoregressive(nf.Affine(), features=4, hidden_features=(16, 16)))
    x = torch.randn(6, 4)
    check_transform(maf, x)
    iaf = nf.Inverse(maf)
    check_transform(iaf, x)


def test_inverse_evaluates_one_feature_per_pass():
    """The sequential inverse does D passes, each for one coordinate's parameters."""
    t = nf.MaskedAutoregressive(nf.RQSpline(4), features=5)
    calls = []
    orig = t.made.sequential_params

    def counting(*a, **k):
        fn = orig(*a, **k)

        def params(x, i):
            calls.append(i)
            return fn(x, i)
        return params

    t.made.sequential_params = counting
    t.inverse(torch.randn(3, 5))
    assert sorted(calls) == list(range(5))


@pytest.mark.parametrize("cfg", [
    dict(features=6, params_per_feature=3, hidden_features=(16, 12)),
    dict(features=6, params_per_feature=2, hidden_features=(10, 10), residual=True),
    dict(features=5, params_per_feature=4, hidden_features=(3, 7, 9), order="random"),
    dict(features=4, params_per_feature=2, hidden_features=(8,), context_features=3,
         order="reversed"),
    dict(features=1, params_per_feature=5, hidden_features=(4, 4), context_features=2),
    dict(features=5, params_per_feature=3, hidden_features=(12, 12), transposed_output=True),
])
def test_sequential_params_match_forward(cfg):
    """The degree-sorted prefix passes give every coordinate's parameters of the full
    forward, for plain, residual, context, random-order, D = 1, H < D and transposed MADEs."""
    torch.manual_seed(0)
    made = MADE(zero_init=False, generator=torch.Generator().manual_seed(1), **cfg).double()
    x = torch.randn(7, made.in_features, dtype=torch.float64)
    ctx = torch.randn(7, cfg["context_features"], dtype=torch.float64) \
        if cfg.get("context_features") else None
    full = made(x, ctx)
    params = made.sequential_params(ctx)
    for i in range(cfg["features"]):
        assert (params(x, i) - full[:, i]).abs().max() < 1e-12
    # the first coordinate in the order depends on no input: its prefix is empty
    first = int(torch.argmin(made.degrees))
    assert torch.equal(params(x, first), params(torch.randn_like(x), first))
    with pytest.raises(IndexError, match="out of range"):
        params(x, cfg["features"])


def test_circular_autoregressive_is_periodic():
    """C16 for the autoregressive layer: angle and angle + 2 pi give the same output."""
    torch.manual_seed(3)
    t = _jitter(nf.MaskedAutoregressive(nf.RQSpline(8, tail_bound=3.0), features=2,
                                        domains=[nf.circle, nf.real]), 0.5).double()
    x = torch.stack([torch.full((7,), 0.5, dtype=torch.float64),
                     torch.linspace(-3, 3, 7, dtype=torch.float64)], 1)
    x2 = x.clone()
    x2[:, 0] += 2 * torch.pi
    z1, l1 = t(x)
    z2, l2 = t(x2)
    d = torch.remainder(z1 - z2 + torch.pi, 2 * torch.pi) - torch.pi
    assert d.abs().max() < 1e-9 and (l1 - l2).abs().max() < 1e-9
    # the real coordinate far outside the tail bound passes through unchanged
    x3 = torch.tensor([[0.5, 10.0], [0.5, -10.0]], dtype=torch.float64)
    z3, _ = t(x3)
    assert torch.equal(z3[:, 1], x3[:, 1])


def test_inverse_after_loading_into_the_made_alone():
    """The generation order lives with the MADE's degrees: loading a random-order MADE's
    state into ``layer.made`` (not the layer) still inverts exactly."""
    torch.manual_seed(0)
    a = jitter_(nf.MaskedAutoregressive(nf.Affine(), features=5, order="random",
                                        generator=torch.Generator().manual_seed(1)).double(), 0.3,
                torch.Generator().manual_seed(3))
    b = nf.MaskedAutoregressive(nf.Affine(), features=5, order="random",
                                generator=torch.Generator().manual_seed(2)).double()
    b.made.load_state_dict(a.made.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64)
    z, _ = b(x)
    assert (b.inverse(z)[0] - x).abs().max() < 1e-10
