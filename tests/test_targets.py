"""Toy targets: normalisation by quadrature, exact samplers' moments, formulas, errors."""

from __future__ import annotations

import math

import pytest
import torch

from normflux.targets import Cylinder, RingOfGaussians, TwoMoons

F64 = torch.float64
PI = math.pi


def _grid_integral(log_prob, xs, ys, periodic_y=False):
    """Trapezoid in x, and in y (a plain Riemann sum over a periodic y, which is the
    trapezoid rule for a periodic integrand)."""
    X, Y = torch.meshgrid(xs, ys, indexing="ij")
    with torch.no_grad():
        p = log_prob(torch.stack([X.reshape(-1), Y.reshape(-1)], 1)).exp().reshape(X.shape)
    inner = p.sum(1) * (ys[1] - ys[0]) if periodic_y else torch.trapezoid(p, ys, dim=1)
    return torch.trapezoid(inner, xs).item()


def test_cylinder_is_normalised():
    """x in [-8, 8] (mass outside ~1e-15) x phi in [-pi, pi) on a 1601 x 512 grid."""
    t = Cylinder()
    xs = torch.linspace(-8, 8, 1601, dtype=F64)
    ys = -PI + 2 * PI / 512 * torch.arange(512, dtype=F64)
    integral = _grid_integral(t.log_prob, xs, ys, periodic_y=True)
    assert abs(integral - 1) < 1e-6, integral
    assert t.log_normalizer == 0.0 and t.domains == ("real", "circle")


def test_cylinder_log_prob_formula_and_periodicity():
    t = Cylinder(slope=3.0, concentration=1.0)
    x = torch.tensor([[0.0, 0.0], [0.5, 1.5], [-1.0, 2.0]], dtype=F64)
    i0 = torch.special.i0(torch.tensor(1.0, dtype=F64))
    ref = (-0.5 * x[:, 0] ** 2 - 0.5 * math.log(2 * PI) + torch.cos(x[:, 1] - 3 * x[:, 0])
           - math.log(2 * PI) - torch.log(i0))
    assert torch.allclose(t.log_prob(x), ref, atol=1e-12)
    shifted = x + torch.tensor([0.0, 2 * PI], dtype=F64)
    assert torch.allclose(t.log_prob(shifted), t.log_prob(x), atol=1e-12)


def test_cylinder_sample_moments():
    """E[x] = 0, Var[x] = 1, E[cos(phi - 3x)] = I1(1)/I0(1), E[sin(phi - 3x)] = 0, with
    5-standard-error bounds (n = 50000, seeded)."""
    n = 50_000
    torch.manual_seed(0)
    s = Cylinder().sample(n).double()
    x, phi = s[:, 0], s[:, 1]
    assert ((phi >= -PI) & (phi < PI)).all()
    assert abs(x.mean().item()) < 5 / math.sqrt(n)
    assert abs(x.var().item() - 1) < 5 * math.sqrt(2 / n)
    k = torch.tensor(1.0, dtype=F64)
    r1 = (torch.special.i1(k) / torch.special.i0(k)).item()  # 0.44639
    r2 = 1 - 2 * r1  # I2/I0 at kappa = 1
    c = torch.cos(phi - 3 * x)
    assert abs(c.mean().item() - r1) < 5 * math.sqrt(((1 + r2) / 2 - r1 ** 2) / n)
    assert abs(torch.sin(phi - 3 * x).mean().item()) < 5 * math.sqrt((1 - r2) / 2 / n)


def test_cylinder_sample_generator_is_reproducible_and_leaves_global_rng():
    t = Cylinder()
    torch.manual_seed(7)
    state = torch.random.get_rng_state()
    a = t.sample(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.random.get_rng_state(), state)
    b = t.sample(100, generator=torch.Generator().manual_seed(3))
    c = t.sample(100, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_ring_of_gaussians_is_normalised_and_its_sampler_matches():
    t = RingOfGaussians().double()
    xs = torch.linspace(-9, 9, 901, dtype=F64)
    assert abs(_grid_integral(t.log_prob, xs, xs) - 1) < 1e-6
    # exact sampler: mean 0, covariance (radius^2 / 2 + scale^2) I for k = 8 equal modes
    n = 50_000
    torch.manual_seed(1)
    s = t.sample(n, generator=torch.Generator().manual_seed(1)).double()
    cov = torch.cov(s.T)
    var = 4.0 ** 2 / 2 + 0.5 ** 2
    assert (s.mean(0).abs() < 5 * math.sqrt(var / n)).all()
    assert (cov - var * torch.eye(2, dtype=F64)).abs().max() < 5 * var * math.sqrt(2 / n) + 0.05
    # the sample's log density is high: near the modes, not between them
    assert (t.log_prob(s) > t.log_prob(torch.zeros(1, 2, dtype=F64))).float().mean() > 0.99


def test_ring_modes_and_dtype():
    t = RingOfGaussians(k=4, radius=2.0, scale=0.3)
    assert torch.allclose(t.means, torch.tensor([[2.0, 0.0], [0.0, 2.0], [-2.0, 0.0], [0.0, -2.0]]),
                          atol=1e-6)
    x = torch.tensor([[2.0, 0.0]], dtype=F64)
    ref = math.log(0.25 / (2 * PI * 0.09))  # the other modes are 2.8 / 0.3 ~ 9 sigma away
    assert abs(t.log_prob(x).item() - ref) < 1e-6
    assert t.log_prob(x).dtype == F64


def test_two_moons_formula():
    t = TwoMoons()
    x = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, -1.0]], dtype=F64)
    r = x.norm(dim=1)
    a = x[:, 0].abs()
    ref = (-0.5 * ((r - 2) / 0.2) ** 2 - 0.5 * ((a - 2) / 0.3) ** 2
           + torch.log1p(torch.exp(-4 * a / 0.09)))
    assert torch.allclose(t.log_prob(x), ref, atol=1e-12)
    assert t.log_normalizer is None
    with pytest.raises(NotImplementedError):
        t.sample(3)


@pytest.mark.parametrize("target", [Cylinder(), TwoMoons(), RingOfGaussians()])
def test_targets_reject_bad_shapes(target):
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        target.log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match=r"\(batch, 2\)"):
        target.log_prob(torch.zeros(2))
