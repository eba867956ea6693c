"""Bad input to the base distributions called directly: a clear error naming what is wrong,
where torch would broadcast a wrong event width quietly, promote a dtype, fail deep inside,
or a constructor value would give NaN / inf later. Valid input keeps its values."""

import math

import pytest
import torch
from torch import distributions as td

import normflux as nf

F64 = torch.float64


def _ind(d):
    return td.Independent(d, 1)


# ------------------------------------------------------------------ log_prob: event width
@pytest.mark.parametrize("make,z,match", [
    (lambda: nf.DiagGaussian(4), torch.zeros(5, 1), r"DiagGaussian.*\(batch, 4\), got \(5, 1\)"),
    (lambda: nf.CircularUniform(3), torch.zeros(5, 1), r"CircularUniform.*\(batch, 3\), got \(5, 1\)"),
    (lambda: nf.Uniform(2), torch.full((2,), 0.5), r"Uniform.*\(batch, 2\), got \(2,\).*reshape\(1, 2\)"),
    (lambda: nf.VonMises(3), torch.zeros(5, 1), r"VonMises.*\(batch, 3\), got \(5, 1\)"),
    (lambda: nf.DiagGaussian(4), torch.zeros(2, 5, 4), r"\(batch, 4\), got \(2, 5, 4\).*reshape\(-1, 4\)"),
    (lambda: nf.Product([nf.DiagGaussian(1), nf.CircularUniform(1)]), torch.zeros(5, 3),
     r"Product.*\(batch, 2\), got \(5, 3\)"),
])
def test_log_prob_rejects_wrong_event_shape(make, z, match):
    with pytest.raises(ValueError, match=match):
        make().log_prob(z)


@pytest.mark.parametrize("make,c", [
    (lambda: nf.ConditionalDiagGaussian(2, 1, hidden_features=(8,)), torch.zeros(3, 1)),
    (lambda: nf.ClassConditionalDiagGaussian(2, 3), torch.zeros(3, 3)),
])
def test_conditional_log_prob_rejects_wrong_event_shape(make, c):
    with pytest.raises(ValueError, match=r"\(batch, 2\), got \(3, 1\)"):
        make().log_prob(torch.zeros(3, 1), c)


def test_log_prob_rejects_a_non_tensor():
    with pytest.raises(TypeError, match="z to be a torch.Tensor, got list"):
        nf.DiagGaussian(2).log_prob([[0.0, 0.0]])


# ------------------------------------------------------------------ dtypes
UNCONDITIONAL = {
    "diag": lambda: nf.DiagGaussian(2),
    "uniform": lambda: nf.Uniform(2),
    "circular": lambda: nf.CircularUniform(2),
    "vonmises": lambda: nf.VonMises(2),
    "product": lambda: nf.Product([nf.DiagGaussian(1), nf.CircularUniform(1)]),
}


@pytest.mark.parametrize("name", sorted(UNCONDITIONAL))
def test_log_prob_names_a_dtype_mismatch(name):
    base = UNCONDITIONAL[name]()
    with pytest.raises(ValueError, match="float32 but z is torch.float64"):
        base.log_prob(torch.zeros(3, 2, dtype=F64))
    with pytest.raises(ValueError, match="floating-point z, got dtype torch.int64"):
        base.log_prob(torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="float64 but z is torch.float32"):
        base.double().log_prob(torch.zeros(3, 2))


@pytest.mark.parametrize("make,C", [
    (lambda: nf.ConditionalDiagGaussian(2, 3, hidden_features=(8,)), 3),
    (lambda: nf.ClassConditionalDiagGaussian(2, 3), 3),
    (lambda: nf.Product([nf.ConditionalDiagGaussian(1, 3, hidden_features=(8,)), nf.DiagGaussian(1)]), 3),
])
def test_conditional_bases_name_a_context_dtype_mismatch(make, C):
    base = make()
    z, c = torch.zeros(4, 2), torch.zeros(4, C)
    with pytest.raises(ValueError, match="float32 but the context is torch.float64"):
        base.log_prob(z, c.double())
    with pytest.raises(ValueError, match="float32 but the context is torch.float64"):
        base.sample(4, c.double())
    with pytest.raises(ValueError, match="float32 but z is torch.float64"):
        base.log_prob(z.double(), c)
    with pytest.raises(ValueError, match="context must be a floating-point tensor"):
        base.log_prob(z, c.long())


# ------------------------------------------------------------------ sample(n)
@pytest.mark.parametrize("n,match", [(-1, "n must be >= 0, got -1"), (2.5, "n must be an integer"),
                                     (None, "n must be an integer"), ("3", "n must be an integer")])
@pytest.mark.parametrize("name", sorted(UNCONDITIONAL))
def test_sample_rejects_a_bad_n(name, n, match):
    base = UNCONDITIONAL[name]()
    with pytest.raises(ValueError, match=match):
        base.sample(n)
    with pytest.raises(ValueError, match=match):
        base.sample_and_log_prob(n)


def test_conditional_sample_rejects_a_bad_n():
    for base in (nf.ConditionalDiagGaussian(2, 1, hidden_features=(8,)),
                 nf.ClassConditionalDiagGaussian(2, 1)):
        with pytest.raises(ValueError, match="n must be >= 0"):
            base.sample(-1, torch.zeros(1, 1))


def test_sample_zero_and_integral_float_still_work():
    for base in [f() for f in UNCONDITIONAL.values()]:
        assert base.sample(0).shape == (0, 2)
        z, lp = base.sample_and_log_prob(0)
        assert z.shape == (0, 2) and lp.shape == (0,)
        assert base.sample(3.0).shape == (3, 2)
    c = nf.ClassConditionalDiagGaussian(2, 3)
    assert c.sample(0, torch.zeros(1, 3)).shape == (0, 2)


# ------------------------------------------------------------------ constructors
@pytest.mark.parametrize("make,match", [
    (lambda: nf.DiagGaussian(2, scale=math.inf), "scale must be a finite number"),
    (lambda: nf.DiagGaussian(2, scale=0.0), "scale must be > 0"),
    (lambda: nf.DiagGaussian(2, scale=-1.0), "scale must be > 0"),
    (lambda: nf.DiagGaussian(2, scale=[1.0, math.inf]), "scale must be finite"),
    (lambda: nf.DiagGaussian(2, scale=1e-50), r"scale must be positive \(> 0 in torch.float32\)"),
    (lambda: nf.DiagGaussian(2, loc=math.nan), "loc must be a finite number"),
    (lambda: nf.DiagGaussian(2, loc=torch.tensor([0.0, math.nan])), "loc must be finite"),
    (lambda: nf.DiagGaussian(2, loc="abc"), "loc must be a real number or a sequence"),
    (lambda: nf.DiagGaussian(2, trainable="no"), "trainable must be True or False"),
    (lambda: nf.DiagGaussian(-1), "features must be >= 1, got -1"),
    (lambda: nf.DiagGaussian(0), "features must be >= 1, got 0"),
    (lambda: nf.DiagGaussian(2.5), "features must be an integer"),
    (lambda: nf.VonMises(2, concentration=math.inf), "concentration must be a finite number"),
    (lambda: nf.VonMises(2, concentration=-1.0), "concentration must be > 0"),
    (lambda: nf.VonMises(2, concentration=[1.0, 0.0]), "concentration must be positive"),
    (lambda: nf.VonMises(2, loc=math.inf), "loc must be a finite number"),
    (lambda: nf.VonMises(-1), "features must be >= 1"),
    (lambda: nf.VonMises(2, trainable=1), "trainable must be True or False"),
    (lambda: nf.Uniform(2, 0.0, math.inf), "high must be a finite number"),
    (lambda: nf.Uniform(2, -math.inf, 0.0), "low must be a finite number"),
    (lambda: nf.Uniform(2, 1.0, 0.0), r"low < high, got low=\[1.0, 1.0\], high=\[0.0, 0.0\]"),
    (lambda: nf.Uniform(1, -3e38, 3e38), "finite width high - low"),
    (lambda: nf.Uniform(0), "features must be >= 1"),
    (lambda: nf.CircularUniform(-1), "features must be >= 1"),
    (lambda: nf.ConditionalDiagGaussian(2, 1, log_scale_bound=0), "log_scale_bound must be > 0"),
    (lambda: nf.ConditionalDiagGaussian(2, 1, log_scale_bound=-1), "log_scale_bound must be > 0"),
    (lambda: nf.ConditionalDiagGaussian(2, 1, log_scale_bound=math.inf),
     "log_scale_bound must be a finite number"),
    (lambda: nf.ConditionalDiagGaussian(0, 1), "features must be >= 1"),
    (lambda: nf.ConditionalDiagGaussian(2, 0), "context_features must be >= 1"),
    (lambda: nf.ConditionalDiagGaussian(2, 1.5), "context_features must be an integer"),
    (lambda: nf.ClassConditionalDiagGaussian(2, -1), "classes must be >= 1, got -1"),
    (lambda: nf.ClassConditionalDiagGaussian(2, 0), "classes must be >= 1, got 0"),
    (lambda: nf.ClassConditionalDiagGaussian(-1, 2), "features must be >= 1"),
])
def test_constructor_values_are_checked(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_product_rejects_non_distribution_parts():
    with pytest.raises(TypeError, match="Product parts must be normflux BaseDistributions, got Linear"):
        nf.Product([nf.DiagGaussian(1), torch.nn.Linear(2, 2)])


# ------------------------------------------------------------------ valid input unchanged
def test_valid_inputs_keep_their_values():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 3, generator=g, dtype=F64)
    dg = nf.DiagGaussian(3, loc=[0.5, -1.0, 2.0], scale=[1.0, 0.3, 2.5]).double()
    assert torch.allclose(dg.log_prob(z), _ind(td.Normal(dg.loc, dg.log_scale.exp())).log_prob(z),
                          atol=1e-12, rtol=0)
    vm = nf.VonMises(3, loc=0.3, concentration=2.0).double()
    assert torch.allclose(vm.log_prob(z), _ind(td.VonMises(vm.loc, vm.log_concentration.exp())).log_prob(z),
                          atol=1e-6, rtol=0)  # torch's log I0 is a polynomial approximation
    cu = nf.CircularUniform(3).double()
    assert torch.allclose(cu.log_prob(z), torch.full((6,), -3 * math.log(2 * math.pi), dtype=F64))
    u = nf.Uniform(3, -10.0, 10.0).double()
    assert torch.allclose(u.log_prob(z), torch.full((6,), -3 * math.log(20.0), dtype=F64))
    # integral-float sizes and int scalars still accepted
    assert nf.DiagGaussian(2.0, loc=1, scale=2).event_shape == (2,)
    # Product of generator parts
    p = nf.Product(q for q in [nf.DiagGaussian(1), nf.Uniform(2, -10.0, 10.0)]).double()
    assert torch.allclose(p.log_prob(z), nf.DiagGaussian(1).double().log_prob(z[:, :1])
                          - 2 * math.log(20.0))


@pytest.mark.parametrize("make", [
    lambda: nf.ConditionalDiagGaussian(2, 3, hidden_features=(8,)),
    lambda: nf.ClassConditionalDiagGaussian(2, 3),
])
def test_context_of_batch_one_still_broadcasts(make):
    base = make().double()
    for p in base.parameters():  # leave the zero initialisation: a context-dependent base
        with torch.no_grad():
            p.copy_(0.3 * torch.randn(p.shape, dtype=F64))
    z = torch.randn(5, 2, dtype=F64)
    c1 = torch.randn(1, 3, dtype=F64)
    lp = base.log_prob(z, c1)
    loc, log_scale = base._loc_log_scale(c1.expand(5, 3))
    assert torch.allclose(lp, _ind(td.Normal(loc, log_scale.exp())).log_prob(z), atol=1e-12)
    assert torch.allclose(lp, base.log_prob(z, c1.expand(5, 3)), atol=1e-12)
    assert base.sample(5, c1).shape == (5, 2)
    assert base.sample(5, c1.expand(5, 3)).shape == (5, 2)
