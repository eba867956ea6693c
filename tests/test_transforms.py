"""Transforms: the harness over every registered layer, C03 (ladj sign and direction),
C14 (torch.func and torch.compile), construction errors and layer semantics."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import (
    CTX,
    LAYER_BY_NAME,
    LAYERS,
    build,
    inputs,
    jacobian_logdet,
    jitter_,
    sample_domain,
)

import normflux
from normflux.testing import check_transform
from normflux.transforms import (
    Additive,
    Affine,
    Chain,
    CircularShift,
    Coupling,
    DomainSpec,
    Inverse,
    MaskedAutoregressive,
    Permutation,
    RQSpline,
    Transform,
    circle,
    interval,
    make_mask,
    real,
)

NAMES = [s.name for s in LAYERS]
SPLINE_NAMES = [s.name for s in LAYERS if s.spline]
CHECKS = ["shapes", "round_trip", "ladj_cancel", "ladj_jacobian", "batch_of_one", "context",
          "gradients", "state_dict", "double"]


def _check_all(report):
    assert report.ok, str(report)
    assert set(CHECKS) <= set(report.results), sorted(report.results)


# ---------------------------------------------------------------------------- harness
@pytest.mark.parametrize("name", NAMES)
def test_harness_float64(name):
    """Every registered transform passes every harness check at random parameters."""
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.3, dtype=torch.float64)
    x, ctx = inputs(spec, n=8, dtype=torch.float64)
    _check_all(check_transform(t, x, ctx))


@pytest.mark.parametrize("name", NAMES)
def test_harness_float32(name):
    """float32 at moderate parameters (jitter 0.1): contract tolerance 1e-5."""
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.1, dtype=torch.float32)
    x, ctx = inputs(spec, n=8, dtype=torch.float32)
    _check_all(check_transform(t, x, ctx))


def _min_singular_value(t, x, ctx):
    """Smallest singular value of the forward Jacobian over the batch (float64)."""
    out = []
    for i in range(x.shape[0]):
        ci = None if ctx is None else ctx[i:i + 1]
        J = torch.autograd.functional.jacobian(lambda v: t(v[None], ci)[0][0], x[i])
        out.append(torch.linalg.svdvals(J).min())
    return torch.stack(out).min().item()


@pytest.mark.parametrize("name", SPLINE_NAMES)
def test_harness_sharp_splines_float64(name):
    """Sharp splines (last-layer bias ~ N(0, 20^2)), float64.

    Such splines have slopes down to ~1e-7 inside a bin (s = h/w ~ 1e-3 with boundary
    slopes ~20), so ``x = inverse(z)`` is ill-conditioned: an error of one ulp in ``z``
    moves ``x`` by ~ulp / slope ~ 1e-9, above the generic 1e-10. The backward error
    ``forward(inverse(z)) - z`` has no such excuse and must be at rounding level; the
    forward error is held to the conditioning bound 64 eps (1 + |z|) / sigma_min(J).
    """
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.3, sharp=True, dtype=torch.float64)
    x, ctx = inputs(spec, n=8, dtype=torch.float64)
    with torch.no_grad():
        z, _ = t(x, ctx)
        xr, _ = t.inverse(z, ctx)
        zr, _ = t(xr, ctx)
    backward_error = (zr - z).abs().max().item()
    assert backward_error <= 1e-12, backward_error
    sigma = _min_singular_value(t, x, ctx)
    eps = torch.finfo(torch.float64).eps
    cond_atol = max(1e-10, 64 * eps * (1 + z.abs().max().item()) / sigma)
    assert cond_atol < 1e-5  # the bound itself must stay meaningful
    _check_all(check_transform(t, x, ctx, atol=cond_atol))


def test_harness_sharp_parameters_are_sharp():
    """The sharp builder really produces unnormalised spline parameters of scale ~20."""
    t = build("rqs-alternating", sharp=True)
    x, _ = inputs(LAYER_BY_NAME["rqs-alternating"], n=64)
    params = t._params(x[:, t.idx_a], None)
    assert 15 < params.std().item() < 25
    _, ladj = t.bijection.forward(x[:, t.idx_b], params, t.spec_b)
    assert ladj.min().item() < math.log(1e-3)  # slopes below min_derivative inside bins


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rqs-mixed-ctx", "circular-shift"])
def test_harness_compile(name):
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.1, dtype=torch.float32)
    x, ctx = inputs(spec, n=8, dtype=torch.float32)
    report = check_transform(t, x, ctx, compile=True)
    _check_all(report)
    assert report.results["compile"][0]


# ------------------------------------------------------------------------------- C03
@pytest.mark.parametrize("name", NAMES)
def test_c03_ladj_direction_and_autograd(name):
    """C03: ladj_fwd = log|det dz/dx|, ladj_inv = log|det dx/dz|, both by autograd,
    round trip and cancellation to 1e-8 (float64, parameters jittered 0.3 N(0, 1))."""
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.3, dtype=torch.float64, seed=3)
    x, ctx = inputs(spec, n=4, dtype=torch.float64, seed=4)
    with torch.no_grad():
        z, lf = t(x, ctx)
        xr, li = t.inverse(z, ctx)
    ref_f = jacobian_logdet(t.forward, x, ctx)
    ref_i = jacobian_logdet(t.inverse, z, ctx)
    assert (lf - ref_f).abs().max() < 1e-8
    assert (li - ref_i).abs().max() < 1e-8
    assert (xr - x).abs().max() < 1e-8
    assert (lf + li).abs().max() < 1e-8


def test_c03_sign_is_not_trivially_zero():
    """The C03 test would notice a sign flip: these layers have ladj far from 0."""
    t = build("affine-alternating", jitter=0.3, seed=3)
    x, _ = inputs(LAYER_BY_NAME["affine-alternating"], n=4, seed=4)
    assert t(x)[1].abs().min() > 1e-2


def test_c03_stack_log_prob_matches_autograd():
    """C03: a 4-layer stack; log_prob = base.log_prob(z) + log|det dz/dx|
    = base.log_prob(z) - log|det dx/dz| (autograd), to 1e-8, float64, D = 3."""
    g = torch.Generator().manual_seed(3)
    layers = Chain([
        Coupling(Affine(), mask="alternating", features=3, hidden_features=(16, 16)),
        Permutation.random(3, generator=g),
        Coupling(RQSpline(8), mask="half", features=3, hidden_features=(16, 16)),
        Coupling(Additive(), mask=[True, False, True], hidden_features=(16, 16)),
    ])
    jitter_(layers, 0.3, g)
    flow = normflux.Flow(layers, normflux.DiagGaussian(3, loc=[0.1, -0.2, 0.3], scale=[1.0, 2.0, 0.5]))
    flow = flow.double()
    x = torch.randn(4, 3, generator=g, dtype=torch.float64)
    lp = flow.log_prob(x)
    with torch.no_grad():
        z, ladj = layers(x)
    ref_fwd = flow.base.log_prob(z) + jacobian_logdet(layers.forward, x)
    ref_inv = flow.base.log_prob(z) - jacobian_logdet(layers.inverse, z)
    assert (lp - ref_fwd).abs().max() < 1e-8
    assert (lp - ref_inv).abs().max() < 1e-8
    assert ladj.abs().min() > 1e-2  # a real change of volume


# ------------------------------------------------------------------------------- C14
def _per_sample_jacobian(t, x, ctx):
    if ctx is None:
        return torch.func.vmap(torch.func.jacrev(lambda v: t.forward(v[None])[0][0]))(x)
    return torch.func.vmap(torch.func.jacrev(
        lambda v, c: t.forward(v[None], c[None])[0][0]))(x, ctx)


@pytest.mark.parametrize("dtype,jit,tol", [(torch.float32, 0.05, 1e-5),
                                           (torch.float64, 0.3, 1e-10)])
@pytest.mark.parametrize("name", NAMES)
def test_c14_vmap_jacrev(name, dtype, jit, tol):
    """C14: vmap(jacrev(forward)) runs on every layer; slogdet(J) equals ladj
    (1e-5 float32 at moderate parameters, 1e-10 float64)."""
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=jit, dtype=dtype)
    x, ctx = inputs(spec, n=5, dtype=dtype)
    J = _per_sample_jacobian(t, x, ctx)
    assert J.shape == (5, spec.features, spec.features)
    with torch.no_grad():
        _, ladj = t(x, ctx)
    assert (torch.linalg.slogdet(J)[1] - ladj).abs().max().item() < tol


def test_c14_vmap_inverse():
    t = build("rqs-mixed-ctx", jitter=0.3)
    x, ctx = inputs(LAYER_BY_NAME["rqs-mixed-ctx"], n=5)
    z, _ = t(x, ctx)
    J = torch.func.vmap(torch.func.jacrev(
        lambda v, c: t.inverse(v[None], c[None])[0][0]))(z.detach(), ctx)
    _, li = t.inverse(z, ctx)
    assert (torch.linalg.slogdet(J)[1] - li).abs().max() < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rqs-random-ctx", "chain-ctx", "inverse-rqs",
                                  "affine-alternating"])
def test_c14_compile_fullgraph(name):
    """C14: torch.compile(fullgraph=True) of forward, inverse and Flow.log_prob match eager
    to 1e-5 (float32); gradients of the compiled log_prob on the C02 mixed in/out-of-bound
    batch are finite and equal eager's."""
    torch._dynamo.reset()
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.1, dtype=torch.float32)
    x, ctx = inputs(spec, n=5, dtype=torch.float32)
    fwd = torch.compile(t.forward, fullgraph=True)
    inv = torch.compile(t.inverse, fullgraph=True)
    with torch.no_grad():
        z, lf = t(x, ctx)
        xr, li = t.inverse(z, ctx)
        zc, lfc = fwd(x, ctx)
        xc, lic = inv(z, ctx)
    for a, b in [(z, zc), (lf, lfc), (xr, xc), (li, lic)]:
        assert torch.allclose(b, a, rtol=1e-5, atol=1e-5)

    flow = normflux.Flow(t, normflux.DiagGaussian(spec.features)).float()
    mixed = torch.tensor([[0.5, -0.5], [4.0, 1.0], [-50.0, 60.0], [2.9, -2.9], [3.0, 3.0]])
    xm = torch.cat([mixed, torch.zeros(5, spec.features - 2)], 1) if spec.features > 2 else mixed
    lp = torch.compile(flow.log_prob, fullgraph=True)
    out_c = lp(xm, ctx)
    out_e = flow.log_prob(xm, ctx)
    # relative: the affine layer sends (-50, 60) to log_prob ~ -1748, whose float32 ulp is 1.2e-4
    assert torch.allclose(out_c, out_e, rtol=1e-5, atol=1e-5)
    (-out_c.mean()).backward()
    grads_c = [p.grad.clone() for p in flow.parameters()]
    assert all(torch.isfinite(g).all() for g in grads_c)
    flow.zero_grad()
    (-out_e.mean()).backward()
    for gc, p in zip(grads_c, flow.parameters()):
        assert torch.allclose(gc, p.grad, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------- construction
def test_make_mask_kinds():
    assert make_mask("alternating", 5).tolist() == [False, True, False, True, False]
    assert make_mask("half", 5).tolist() == [False, False, True, True, True]
    assert make_mask("half", 4, flip=True).tolist() == [True, True, False, False]
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    m = make_mask("random", 7, generator=g1)
    assert m.sum().item() == 4 and torch.equal(m, make_mask("random", 7, generator=g2))
    with pytest.raises(ValueError, match="unknown mask kind"):
        make_mask("checkerboard", 4)
    with pytest.raises(ValueError, match="at least 2"):
        make_mask("half", 1)


@pytest.mark.parametrize("kwargs,match", [
    (dict(mask=[True, True, True]), "at least one transformed"),
    (dict(mask=[False, False]), "at least one transformed"),
    (dict(mask="half"), "needs features"),
    (dict(mask=[True, False], features=3), "2 entries for 3 features"),
    (dict(mask=[[True, False]]), "1-D"),
    (dict(mask="half", features=3, domains=[real, real]), "2 domains for 3 features"),
])
def test_coupling_construction_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Coupling(Affine(), **kwargs)


@pytest.mark.parametrize("bij", [Affine(), Additive()])
def test_affine_additive_reject_non_real_domains(bij):
    with pytest.raises(ValueError, match="does not support circle"):
        Coupling(bij, mask=[False, True], domains=[real, circle])
    # a circular *conditioning* coordinate is fine (the conditioner sees cos, sin)
    Coupling(bij, mask=[True, False], domains=[real, circle])


def test_other_construction_errors():
    with pytest.raises(ValueError, match="not a permutation"):
        Permutation([0, 0, 1])
    with pytest.raises(ValueError, match="circular"):
        CircularShift([real, real])
    with pytest.raises(ValueError, match="different context sizes"):
        Chain([Coupling(Affine(), mask="half", features=2, context_features=3),
               Coupling(Affine(), mask="half", features=2, context_features=4)])
    with pytest.raises(TypeError):
        Chain([torch.nn.Linear(2, 2)])
    with pytest.raises(TypeError):
        Inverse(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError):
        interval(1.0, 1.0)
    with pytest.raises(ValueError):
        RQSpline(0)
    with pytest.raises(ValueError):
        Affine(log_scale_bound=0.0)


def _conditioner_layers_only(spec):
    t = spec.build(torch.Generator().manual_seed(0))
    leaves = [m for m in t.modules() if isinstance(m, Transform)
              and not isinstance(m, (Chain, Inverse))]
    return all(isinstance(m, (Coupling, MaskedAutoregressive, Permutation, CircularShift))
               for m in leaves) and any(isinstance(m, (Coupling, MaskedAutoregressive))
                                        for m in leaves)


@pytest.mark.parametrize("name", [s.name for s in LAYERS if _conditioner_layers_only(s)])
def test_layers_start_at_identity(name):
    """With the default zero-initialised conditioner head every coupling and autoregressive
    layer is the identity (flows start at the identity)."""
    spec = LAYER_BY_NAME[name]
    t = spec.build(torch.Generator().manual_seed(0)).double()
    x, ctx = inputs(spec, n=6)
    z, ladj = t(x, ctx)
    perm_free = not any(isinstance(m, (Permutation, CircularShift)) for m in t.modules())
    if perm_free:
        assert torch.allclose(z, x, atol=1e-12, rtol=0)
    assert ladj.abs().max() < 1e-12


def test_permutation_semantics():
    p = Permutation(torch.tensor([2, 0, 1]))
    x = torch.tensor([[10.0, 11.0, 12.0]])
    z, ladj = p(x)
    assert z.tolist() == [[12.0, 10.0, 11.0]] and ladj.tolist() == [0.0]
    assert p.inverse(z)[0].tolist() == x.tolist()
    assert Permutation.reverse(3)(x)[0].tolist() == [[12.0, 11.0, 10.0]]
    assert "perm" in p.state_dict()


def test_permutation_loaded_state_sets_the_map_and_its_gradient():
    """A reversal (computed as a flip) and another permutation swap functions through
    ``load_state_dict``; values, inverses and gradients follow the loaded ``perm``."""
    x = torch.arange(8.0).reshape(2, 4).requires_grad_()
    rev, other = Permutation.reverse(4), Permutation([1, 3, 0, 2])
    rev_state = {k: v.clone() for k, v in rev.state_dict().items()}
    rev.load_state_dict(other.state_dict())
    other.load_state_dict(rev_state)
    for layer, perm in ((rev, [1, 3, 0, 2]), (other, [3, 2, 1, 0])):
        z = layer(x)[0]
        assert torch.equal(z, x[:, perm]) and torch.equal(layer.inverse(z)[0], x)
        w = torch.arange(8.0).reshape(2, 4) ** 2
        (g,) = torch.autograd.grad((z * w).sum(), x)
        assert torch.equal(g[:, perm], w)


def test_circular_shift_semantics():
    t = CircularShift([circle, real], shift=1.0)
    x = torch.tensor([[3.0, 7.0], [-3.0, -7.0]], dtype=torch.float64)
    z, ladj = t(x)
    assert torch.allclose(z[:, 0], torch.tensor([4.0 - 2 * math.pi, -2.0], dtype=torch.float64))
    assert torch.equal(z[:, 1], x[:, 1]) and torch.equal(ladj, torch.zeros(2, dtype=torch.float64))
    assert (z[:, 0] >= -math.pi).all() and (z[:, 0] < math.pi).all()


def test_chain_order_and_inverse_swap():
    a = Coupling(Affine(), mask="half", features=2, hidden_features=(8,))
    b = Permutation.reverse(2)
    jitter_(a, 0.5, torch.Generator().manual_seed(0))
    x = torch.randn(5, 2)
    z, l = Chain([a, b])(x)
    za, la = a(x)
    assert torch.equal(z, b(za)[0]) and torch.equal(l, la)
    inv = Inverse(Chain([a, b]))
    xi, li = inv(z)
    assert torch.allclose(xi, x, atol=1e-6) and torch.allclose(li, -l, atol=1e-6)
    assert torch.equal(Inverse(inv)(x)[0], z)
    assert len(Chain([a, b])) == 2 and Chain([a, b])[1] is b


def test_chain_skips_the_zero_ladj_of_volume_preserving_members():
    """A chain adds only the ladj of members that are not volume preserving (the first of
    them is its ladj as it is); one of permutations alone returns zeros of the input's
    dtype; chains and inverses inherit the flag."""
    a = Coupling(Affine(), mask="half", features=2, hidden_features=(8,))
    c = Coupling(Affine(), mask="half", features=2, hidden_features=(8,), flip=True)
    jitter_(a, 0.5, torch.Generator().manual_seed(0))
    jitter_(c, 0.5, torch.Generator().manual_seed(1))
    p = Permutation.reverse(2)
    x = torch.randn(5, 2, dtype=torch.float64)
    a.double(), c.double()
    z, l = Chain([p, a, p, c, p])(x)
    za, la = a(p(x)[0])
    zc, lc = c(p(za)[0])
    assert torch.equal(z, p(zc)[0]) and torch.equal(l, la + lc)
    xi, li = Chain([p, a, p, c, p]).inverse(z)
    assert torch.allclose(xi, x, atol=1e-12) and torch.allclose(li, -l, atol=1e-12)
    zp, lp = Chain([p, p, p])(x)
    assert torch.equal(zp, p(x)[0]) and torch.equal(lp, torch.zeros(5, dtype=torch.float64))
    assert Chain([p, p]).volume_preserving and Inverse(Chain([p])).volume_preserving
    assert not Chain([p, a]).volume_preserving and not Inverse(a).volume_preserving


def test_harness_checks_that_a_volume_preserving_ladj_is_zero():
    """check_transform fails a transform that declares itself volume preserving and returns
    a nonzero ladj (a chain would drop it)."""
    class Shift(Transform):
        volume_preserving = True

        def forward(self, x, context=None):
            return x + 1, torch.full((x.shape[0],), 0.5, dtype=x.dtype)

        def inverse(self, z, context=None):
            return z - 1, torch.full((z.shape[0],), -0.5, dtype=z.dtype)

    report = check_transform(Shift(), torch.randn(4, 3), raise_on_failure=False, jacobian=False)
    assert report.results["volume_preserving"][0] is False
    assert check_transform(Permutation.reverse(3), torch.randn(4, 3)).ok


def test_coupling_conditioner_sees_cos_sin_of_circular_inputs():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self, n_in, n_out, ctx):
            super().__init__()
            self.n_out = n_out
            self.lin = torch.nn.Linear(n_in, n_out)

        def forward(self, h):
            seen.append(h)
            return self.lin(h) * 0

    t = Coupling(RQSpline(4), Probe, mask=[False, False, True], domains=[real, circle, real])
    x = torch.tensor([[0.3, 0.5, 1.0], [0.3, 0.5 + 2 * math.pi, 1.0], [0.3, 0.5 - 2 * math.pi, 1.0],
                      [0.3, -math.pi, 1.0], [0.3, math.pi, 1.0]], dtype=torch.float32)
    t(x)
    h = seen[0]
    assert h.shape == (5, 3) and torch.equal(h[:, 0], x[:, 0])
    assert torch.allclose(h[:, 1] ** 2 + h[:, 2] ** 2, torch.ones(5))  # on the unit circle
    # the same point of the circle gives the same features: 0.5 ~ 0.5 +- 2 pi, -pi ~ pi
    assert torch.allclose(h[1:3], h[:1].expand(2, 3), atol=1e-6)
    assert torch.allclose(h[3], h[4], atol=1e-6)
    # and distinct points give distinct features (the angle is not discarded)
    assert (h[0] - h[3]).abs().max() > 0.1


def test_domain_spec_wrap():
    spec = DomainSpec([circle, real, interval(0, 1)]).double()
    x = torch.tensor([[math.pi, 5.0, 2.0], [-math.pi - 0.5, -5.0, -1.0]], dtype=torch.float64)
    w = spec.wrap(x)
    assert torch.allclose(w, torch.tensor([[-math.pi, 5.0, 2.0],
                                           [math.pi - 0.5, -5.0, -1.0]], dtype=torch.float64))
    assert spec.num_features() == 4


def test_context_handling_of_layers():
    t = build("affine-half-ctx")
    x = torch.randn(8, 5, dtype=torch.float64)
    c = torch.randn(1, CTX, dtype=torch.float64)
    # a (1, C) context broadcasts over the batch
    assert torch.allclose(t(x, c)[0], t(x, c.expand(8, CTX))[0])
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        t(x, torch.randn(8, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"context.*(8.*5|5.*8)"):
        t(x, torch.randn(5, CTX, dtype=torch.float64))
    with pytest.raises(ValueError, match="context"):
        t(x, None)
    with pytest.raises(ValueError, match="context"):
        t(x, torch.zeros(8, CTX, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        build("affine-alternating")(torch.randn(2, 4, dtype=torch.float64),
                                    torch.randn(2, 4, dtype=torch.float64))


def test_sample_domain_inside_support():
    g = torch.Generator().manual_seed(0)
    from helpers import MIXED
    x = sample_domain(MIXED, 1000, g)
    assert ((x[:, 1] >= -math.pi) & (x[:, 1] < math.pi)).all()
    assert ((x[:, 2] > -1) & (x[:, 2] < 2)).all() and ((x[:, 5] > 0) & (x[:, 5] < 1)).all()


def test_a_chain_edited_after_construction_still_adds_its_ladj():
    """volume_preserving follows the members: a chain of a permutation that later gets a
    MAF layer appended is not volume preserving, and an outer chain adds its ladj."""
    torch.manual_seed(0)
    maf = MaskedAutoregressive(Affine(), features=3, hidden_features=(16,))
    jitter_(maf, 0.5, torch.Generator().manual_seed(0))
    inner = Chain([Permutation.reverse(3)])
    outer = Chain([inner])
    assert outer.volume_preserving
    inner.transforms.append(maf)
    x = torch.randn(5, 3)
    _, l_inner = inner(x)
    assert not outer.volume_preserving and l_inner.abs().min() > 0
    assert torch.equal(outer(x)[1], l_inner)
    assert torch.allclose(Inverse(outer)(outer(x)[0])[1], -l_inner, atol=1e-5)
