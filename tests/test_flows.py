"""The Flow model: API and shapes, losses (closed-form KL), the Distribution view, input
errors, and the cases C08 (serialisation), C10 (dtype), C11 (conditional sample/log_prob),
C12 (context errors)."""

from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from helpers import CONDITIONAL_LAYERS, CTX, LAYER_BY_NAME, build, jitter_, seeded
from torch import nn

import normflux as nf
from normflux.transforms import Transform

F32, F64 = torch.float32, torch.float64


def base_for(domains) -> nf.distributions.BaseDistribution:
    """A base matching each coordinate's domain: N(0,1) on real, von Mises on circle,
    uniform on interval (joined by Product)."""
    parts = []
    for d in domains:
        if d.kind == "real":
            parts.append(nf.DiagGaussian(1))
        elif d.kind == "circle":
            parts.append(nf.VonMises(1, loc=0.5, concentration=2.0))
        else:
            parts.append(nf.Uniform(1, d.low, d.high))
    return parts[0] if len(parts) == 1 else nf.Product(parts)


def layer_flow(name, dtype=F64, jitter=0.2, seed=0):
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=jitter, dtype=dtype, seed=seed)
    base = nf.DiagGaussian(spec.features) if all(d.kind == "real" for d in spec.domains) \
        else base_for(spec.domains)
    return nf.Flow(t, base).to(dtype)


def small_flow(D=3, context=None, dtype=F64, seed=0, trainable_base=False):
    """A mixed flow: coupling spline, random permutation, coupling affine, AR spline, LU."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        t = nf.Chain([
            nf.Coupling(nf.RQSpline(6), mask="alternating", features=D, context_features=context,
                        hidden_features=(16, 16)),
            nf.Permutation.random(D, generator=g),
            nf.Coupling(nf.Affine(), mask="half", features=D, hidden_features=(16, 16)),
            nf.MaskedAutoregressive(nf.RQSpline(6), features=D, context_features=context,
                                    hidden_features=(16, 16)),
            nf.LULinear(D),
        ])
        jitter_(t, 0.2, g)
        base = nf.DiagGaussian(D, loc=0.3, scale=1.5, trainable=trainable_base)
    return nf.Flow(t, base).to(dtype)


# ------------------------------------------------------------------------- API
def test_shapes():
    flow = small_flow()
    assert flow.log_prob(torch.randn(5, 3, dtype=F64)).shape == (5,)
    assert flow.log_prob(torch.randn(2, 4, 3, dtype=F64)).shape == (2, 4)
    assert flow.sample(7).shape == (7, 3)
    x, lp = flow.sample_and_log_prob(7)
    assert x.shape == (7, 3) and lp.shape == (7,)
    assert flow.sample(0).shape == (0, 3)
    assert flow.event_shape == (3,)


def test_leading_batch_dimensions_are_flattened_and_restored():
    flow = small_flow()
    x = torch.randn(2, 4, 3, dtype=F64)
    assert torch.allclose(flow.log_prob(x).reshape(-1), flow.log_prob(x.reshape(8, 3)), atol=1e-12)


@pytest.mark.parametrize("dtype,tol", [(F32, 1e-4), (F64, 1e-10)])
def test_sample_and_log_prob_agrees_with_log_prob(dtype, tol):
    flow = small_flow(dtype=dtype)
    x, lq = flow.sample_and_log_prob(64)
    assert x.dtype == dtype and lq.dtype == dtype
    assert (lq - flow.log_prob(x)).abs().max() < tol
    # sample() draws from the same distribution path: same seed, same points
    torch.manual_seed(3)
    a = flow.sample(16)
    torch.manual_seed(3)
    b, _ = flow.sample_and_log_prob(16)
    assert torch.allclose(a, b, atol=1e-12)


def test_samples_are_reparameterised():
    flow = small_flow(trainable_base=True)
    x, lq = flow.sample_and_log_prob(32)
    x.sum().backward()
    assert flow.base.loc.grad is not None and flow.base.loc.grad.abs().sum() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in flow.transform.parameters())


def test_forward_kld_is_mean_nll():
    flow = small_flow()
    x = torch.randn(10, 3, dtype=F64)
    assert torch.allclose(flow.forward_kld(x), -flow.log_prob(x).mean(), atol=1e-12)


def test_log_prob_of_a_layerless_flow_is_the_base():
    flow = nf.Flow(nf.Chain([]), nf.DiagGaussian(2, loc=[1.0, -1.0], scale=[0.5, 2.0])).double()
    x = torch.randn(6, 2, dtype=F64)
    ref = torch.distributions.Independent(
        torch.distributions.Normal(torch.tensor([1.0, -1.0], dtype=F64),
                                   torch.tensor([0.5, 2.0], dtype=F64)), 1).log_prob(x)
    assert torch.allclose(flow.log_prob(x), ref, atol=1e-12)


def _gauss_kl(m1, s1, m2, s2):
    return (torch.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5).sum()


@pytest.mark.parametrize("beta", [1.0, 0.5])
def test_reverse_kld_closed_form_and_gradients(beta):
    """A layerless flow with a trainable Gaussian base q = N(m1, s1^2) against a shifted
    Gaussian target p = N(m2, s2^2): reverse_kld estimates E_q[log q - beta log p], which is
    KL(q||p) at beta = 1 (target normalised), with a reparameterised gradient equal to the
    closed form (m1 - m2)/s2^2 for the mean. Tolerances: 5 standard errors of the
    per-sample terms (n = 200000, seeded)."""
    m1, s1 = torch.tensor([0.2, -0.5], dtype=F64), torch.tensor([0.8, 1.3], dtype=F64)
    m2, s2 = torch.tensor([1.0, 0.5], dtype=F64), torch.tensor([1.2, 0.9], dtype=F64)
    flow = nf.Flow(nf.Chain([]), nf.DiagGaussian(2, loc=m1, scale=s1, trainable=True)).double()
    target = nf.DiagGaussian(2, loc=m2, scale=s2).double()
    n = 200_000
    torch.manual_seed(0)
    est = flow.reverse_kld(target, n, beta=beta)
    # closed form of E_q[log q] and E_q[log p]
    e_log_q = (-0.5 - torch.log(s1) - 0.5 * math.log(2 * math.pi)).sum()
    e_log_p = (-torch.log(s2) - 0.5 * math.log(2 * math.pi)
               - (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2)).sum()
    exact = e_log_q - beta * e_log_p
    if beta == 1.0:
        assert torch.allclose(exact, _gauss_kl(m1, s1, m2, s2), atol=1e-12)
    torch.manual_seed(0)
    x, lq = flow.sample_and_log_prob(n)
    terms = (lq - beta * target.log_prob(x)).detach()
    se = terms.std().item() / math.sqrt(n)
    assert abs(est.item() - exact.item()) < 5 * se
    est.backward()
    grad_loc = flow.base.loc.grad
    exact_grad = beta * (m1 - m2) / s2 ** 2
    se_grad = beta * s1 / s2 ** 2 / math.sqrt(n)
    assert ((grad_loc - exact_grad).abs() < 5 * se_grad).all()
    grad_ls = flow.base.log_scale.grad  # d/dlog s1 of E[log q - beta log p] = -1 + beta s1^2/s2^2
    exact_ls = -1 + beta * s1 ** 2 / s2 ** 2
    se_ls = beta * (s1 * (m1 - m2).abs() + math.sqrt(2) * s1 ** 2) / s2 ** 2 / math.sqrt(n)
    assert ((grad_ls - exact_ls).abs() < 5 * se_ls).all()


def test_reverse_kld_minimisation_reaches_the_target():
    """A few hundred Adam steps of reverse KL move the base onto the target (KL -> ~0)."""
    torch.manual_seed(0)
    flow = nf.Flow(nf.Chain([]), nf.DiagGaussian(2, trainable=True)).double()
    target = nf.DiagGaussian(2, loc=[1.0, -2.0], scale=[0.5, 2.0]).double()
    opt = torch.optim.Adam(flow.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        flow.reverse_kld(target, 256).backward()
        opt.step()
    kl = _gauss_kl(flow.base.loc, flow.base.log_scale.exp(), target.loc, target.log_scale.exp())
    assert kl.item() < 0.01


# ------------------------------------------------------------- Distribution view
def test_distribution_view_unconditional():
    flow = small_flow(trainable_base=True)
    d = flow.distribution()
    assert isinstance(d, torch.distributions.Distribution)
    assert d.batch_shape == () and d.event_shape == (3,)
    x = torch.randn(5, 3, dtype=F64)
    assert torch.equal(d.log_prob(x), flow.log_prob(x))
    s = d.sample((2, 4))
    assert s.shape == (2, 4, 3) and not s.requires_grad
    r = d.rsample((6,))
    assert r.shape == (6, 3) and r.requires_grad
    r.sum().backward()
    assert flow.base.loc.grad is not None and flow.base.loc.grad.abs().sum() > 0
    xs, lp = d.rsample_and_log_prob((4,))
    assert (lp - d.log_prob(xs)).abs().max() < 1e-10
    assert flow().event_shape == (3,)
    one = d.sample()
    assert one.shape == (3,) and d.log_prob(one).shape == ()
    assert torch.allclose(d.log_prob(one), flow.log_prob(one[None])[0])


def test_distribution_view_conditional():
    flow = small_flow(context=CTX)
    ctx = torch.randn(3, CTX, dtype=F64)
    d = flow(ctx)
    assert d.batch_shape == (3,) and d.event_shape == (3,)
    s = d.sample((7,))
    assert s.shape == (7, 3, 3)
    lp = d.log_prob(s)
    assert lp.shape == (7, 3)
    xs, lq = d.rsample_and_log_prob((5,))
    assert xs.shape == (5, 3, 3) and (lq - d.log_prob(xs)).abs().max() < 1e-10
    one = flow(ctx[0])
    assert one.batch_shape == () and one.sample((4,)).shape == (4, 3)


# ------------------------------------------------------------------ input errors
def test_bad_inputs_are_rejected_with_clear_errors():
    flow = small_flow(dtype=F32)
    with pytest.raises(ValueError, match=r"shape \(\*batch, 3\).*\(5, 4\)"):
        flow.log_prob(torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"shape \(\*batch, 3\).*\(4,\)"):
        flow.log_prob(torch.randn(4))
    # a single event (no batch dimension) is accepted and gives a scalar
    single = flow.log_prob(torch.zeros(3))
    assert single.shape == () and torch.allclose(single, flow.log_prob(torch.zeros(1, 3))[0])
    with pytest.raises(ValueError, match="floating-point.*int64"):
        flow.log_prob(torch.zeros(5, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="float64.*float32"):
        flow.log_prob(torch.randn(5, 3, dtype=F64))
    x = torch.randn(5, 3)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"NaN.*\[2\]"):
        flow.log_prob(x)
    with pytest.raises(ValueError, match="unconditional"):
        flow.log_prob(torch.randn(5, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match="unconditional"):
        flow.sample(4, torch.randn(2))
    with pytest.raises(TypeError):
        flow.log_prob([[0.0, 0.0, 0.0]])


def test_dtype_check_follows_conversions_after_first_use():
    # the flow looks its dtype up once; a later conversion, of the flow or of its parts,
    # must still be seen by the check (and by the message)
    flow = small_flow(dtype=F32)
    flow.log_prob(torch.randn(5, 3))
    flow.double()
    with pytest.raises(ValueError, match="float32 but the flow is torch.float64"):
        flow.log_prob(torch.randn(5, 3))
    assert flow.log_prob(torch.randn(5, 3, dtype=F64)).dtype == F64
    flow.transform.float()
    flow.base.float()
    with pytest.raises(ValueError, match="float64 but the flow is torch.float32"):
        flow.log_prob(torch.randn(5, 3, dtype=F64))
    assert flow.log_prob(torch.randn(5, 3)).dtype == F32
    # a copy and a pickled flow have their own dtype: converting the original leaves them
    buf = io.BytesIO()
    torch.save(flow, buf)
    copy_ = copy.deepcopy(flow)
    flow.double()
    buf.seek(0)
    for other in (copy_, torch.load(buf, weights_only=False)):
        assert other.log_prob(torch.randn(5, 3)).dtype == F32
    # parameters replaced by a load with assign=True, while a graph keeps the old ones
    # alive: the flow and every layer check against the new ones
    flow = small_flow(dtype=F32)
    graph = flow.log_prob(torch.randn(5, 3)).sum()
    flow.load_state_dict({k: v.double() if v.is_floating_point() else v
                          for k, v in flow.state_dict().items()}, assign=True)
    assert flow.log_prob(torch.randn(5, 3, dtype=F64)).dtype == F64
    with pytest.raises(ValueError, match="float32 but the flow is torch.float64"):
        flow.log_prob(torch.randn(5, 3))
    del graph
    # and the first parameter replaced by assignment (the others stay float64)
    name, first = next(flow.named_parameters())
    owner, _, attr = name.rpartition(".")
    setattr(flow.get_submodule(owner), attr, nn.Parameter(first.detach().float()))
    with pytest.raises(ValueError, match="float64 but the flow is torch.float32"):
        flow.log_prob(torch.randn(5, 3, dtype=F64))


def test_inputs_on_another_device_are_named():
    # the meta device stands in for a GPU: before, the NaN check failed on it with
    # "Tensor.item() cannot be called on meta tensors"
    flow = small_flow(context=CTX, dtype=F32)
    x, c = torch.randn(4, 3), torch.randn(4, CTX)
    with pytest.raises(ValueError, match=r"x is on meta but the flow is on cpu.*x.to\('cpu'\)"):
        flow.log_prob(x.to("meta"), c)
    with pytest.raises(ValueError, match="context is on meta but the flow is on cpu"):
        flow.log_prob(x, c.to("meta"))
    with pytest.raises(ValueError, match="context is on meta but the flow is on cpu"):
        flow.sample(4, c[0].to("meta"))


def test_bad_context_values_are_rejected():
    flow = small_flow(context=CTX, dtype=F32)
    x = torch.randn(4, 3)
    c = torch.randn(4, CTX)
    c[1, 0] = float("nan")
    with pytest.raises(ValueError, match="context contains NaN"):
        flow.log_prob(x, c)
    with pytest.raises(ValueError, match="context.*floating"):
        flow.log_prob(x, torch.zeros(4, CTX, dtype=torch.long))
    with pytest.raises(ValueError, match="context.*float64.*float32"):
        flow.log_prob(x, torch.randn(4, CTX, dtype=F64))


def test_mismatched_context_sizes_at_construction():
    t = nf.Coupling(nf.Affine(), mask="half", features=2, context_features=3)
    with pytest.raises(ValueError, match="different context sizes"):
        nf.Flow(t, nf.DiagGaussian(2), context_features=4)


# ------------------------------------------------------------------------------ C08
def _c08_flow(seed):
    """C08's flow (D = 5): random permutation, LU-linear (random P), AR-RQS with a random
    order, coupling RQS with a random mask, MAF, ActNorm (initialised); every random choice
    drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    with seeded(seed):
        D = 5
        t = nf.Chain([
            nf.Permutation.random(D, generator=g),
            nf.LULinear(D, permutation=torch.randperm(D, generator=g)),
            nf.MaskedAutoregressive(nf.RQSpline(6), features=D, order="random", generator=g,
                                    hidden_features=(16, 16)),
            nf.Coupling(nf.RQSpline(6), mask="random", features=D, generator=g,
                        hidden_features=(16, 16)),
            nf.MaskedAutoregressive(nf.Affine(), features=D, hidden_features=(16, 16)),
            nf.ActNorm(D),
        ])
        t[-1].initialize(torch.randn(32, D, generator=g) * 2 + 1)
        jitter_(t, 0.2, g)
        return nf.Flow(t, nf.DiagGaussian(D)).double()


def _random_buffers(flow):
    return {k: v for k, v in flow.state_dict().items()
            if any(s in k for s in ("perm", "mask", "degrees"))}


def test_c08_state_dict_carries_every_random_choice():
    a, b = _c08_flow(1), _c08_flow(2)
    x = torch.randn(8, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    assert (a.log_prob(x) - b.log_prob(x)).abs().max() > 1e-3  # different before loading
    # the seeds really drew different permutations, masks and orders
    ra, rb = _random_buffers(a), _random_buffers(b)
    assert ra.keys() == rb.keys() and any(not torch.equal(ra[k], rb[k]) for k in ra)
    b.load_state_dict(a.state_dict(), strict=True)
    assert (a.log_prob(x) - b.log_prob(x)).abs().max() < 1e-6
    for k, v in _random_buffers(b).items():
        assert torch.equal(v, ra[k]), k
    torch.manual_seed(5)
    sa = a.sample(8)
    torch.manual_seed(5)
    sb = b.sample(8)
    assert (sa - sb).abs().max() < 1e-6


@pytest.mark.parametrize("how", ["pickle", "deepcopy", "torch.save"])
def test_c08_whole_model_round_trips(how):
    a = _c08_flow(1)
    x = torch.randn(8, 5, dtype=F64, generator=torch.Generator().manual_seed(0))
    if how == "pickle":
        b = pickle.loads(pickle.dumps(a))
    elif how == "deepcopy":
        b = copy.deepcopy(a)
    else:
        buf = io.BytesIO()
        torch.save(a, buf)
        buf.seek(0)
        b = torch.load(buf, weights_only=False)
    assert b is not a
    assert (a.log_prob(x) - b.log_prob(x)).abs().max() < 1e-6
    torch.manual_seed(5)
    sa = a.sample(8)
    torch.manual_seed(5)
    assert (sa - b.sample(8)).abs().max() < 1e-6


def test_c08_state_dict_through_torch_save_weights_only():
    a, b = _c08_flow(1), _c08_flow(2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    x = torch.randn(8, 5, dtype=F64)
    assert (a.log_prob(x) - b.log_prob(x)).abs().max() < 1e-6


# ------------------------------------------------------------------------------ C10
def _plain_tensor_attributes(module: nn.Module):
    """Tensors held as plain attributes (not parameters/buffers): they would not follow
    ``.to()``."""
    out = []
    for name, m in module.named_modules():
        for k, v in vars(m).items():
            if isinstance(v, torch.Tensor) and k not in ("_parameters", "_buffers"):
                out.append(f"{name}.{k}")
    return out


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("context", [None, CTX])
def test_c10_dtype_reaches_every_output(dtype, context):
    flow = small_flow(context=context, dtype=F32).to(dtype)
    c = None if context is None else torch.randn(5, context, dtype=dtype)
    x = torch.randn(5, 3, dtype=dtype)
    outs = [flow.sample(5, c), flow.log_prob(x, c), *flow.sample_and_log_prob(5, c),
            *flow.transform(x, c), *flow.transform.inverse(x, c)]
    for layer in flow.transform:
        cl = c if layer.context_features is not None else None
        outs += [*layer(x, cl), *layer.inverse(x, cl)]
    assert all(o.dtype == dtype for o in outs), [o.dtype for o in outs]
    for name, t in list(flow.named_parameters()) + list(flow.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == dtype, name
    assert not _plain_tensor_attributes(flow)


def test_c10_float64_ladj_matches_autograd_to_1e12():
    flow = small_flow(dtype=F32).double()
    x = torch.randn(5, 3, dtype=F64)
    from helpers import jacobian_logdet
    _, ladj = flow.transform(x)
    assert (ladj - jacobian_logdet(flow.transform.forward, x)).abs().max() < 1e-12


class _ElementwiseAffine(Transform):
    """Test-local 'AffineConst': z = x * exp(s) + t with a parameter vector s (no context)."""

    def __init__(self, log_scale: torch.Tensor):
        super().__init__()
        self.log_scale = nn.Parameter(log_scale.clone())
        self.shift = nn.Parameter(torch.zeros_like(log_scale))

    def forward(self, x, context=None):
        self._check(x, context)
        return x * torch.exp(self.log_scale) + self.shift, self.log_scale.sum().expand(x.shape[0])

    def inverse(self, z, context=None):
        self._check(z, context)
        return (z - self.shift) * torch.exp(-self.log_scale), (-self.log_scale.sum()).expand(z.shape[0])


class _ConstantParams(nn.Module):
    """A conditioner that ignores its input and returns fixed parameters."""

    def __init__(self, params):
        super().__init__()
        self.params = nn.Parameter(params)

    def forward(self, h):
        return self.params.expand(h.shape[0], -1)


def _log_scales(n, total, seed):
    u = torch.rand(n, dtype=F64, generator=torch.Generator().manual_seed(seed)) + 0.5
    return u * (total / u.sum())


def test_c10_1000d_constant_log_scale_ladj_float64():
    """C10: a float64 model with a 1000-D constant-log-scale layer whose log-scales sum to
    12345.678901234 returns that ladj to 1e-9 (no float32 accumulator anywhere).

    Two layers stand in for the case's AffineConst: a test-local elementwise affine
    Transform (1000 log-scales), and a Coupling(Affine) over 2000 coordinates whose
    constant conditioner gives its 1000 transformed coordinates log-scales (through the
    tanh bound) summing to 12345.678901234. Both in a Chain inside a Flow."""
    total = 12345.678901234
    s1 = _log_scales(1000, total, 0)
    layer1 = _ElementwiseAffine(s1.float()).double()
    with torch.no_grad():
        layer1.log_scale.copy_(s1)
    B = 100.0
    s2 = _log_scales(1000, total, 1)  # < 37, well inside the tanh bound
    raw = B * torch.atanh(s2 / B)
    params = torch.stack([torch.zeros(1000, dtype=F64), raw], 1).reshape(-1)
    layer2 = nf.Coupling(nf.Affine(log_scale_bound=B), _ConstantParams(params.float()),
                         mask="alternating", features=2000).double()
    with torch.no_grad():
        layer2.conditioner.params.copy_(params)
    x1 = torch.randn(3, 1000, dtype=F64) * 1e-3
    _, l1 = layer1(x1)
    assert l1.dtype == F64 and (l1 - total).abs().max() < 1e-9
    x2 = torch.randn(3, 2000, dtype=F64) * 1e-3
    z2, l2 = layer2(x2)
    assert l2.dtype == F64 and (l2 - total).abs().max() < 1e-9
    _, li2 = layer2.inverse(z2)
    assert (li2 + total).abs().max() < 1e-9
    flow = nf.Flow(nf.Chain([layer1]), nf.DiagGaussian(1000)).double()
    _, lc = flow.transform(x1)
    assert (lc - total).abs().max() < 1e-9
    lp = flow.log_prob(x1)
    z1 = x1 * torch.exp(s1)
    assert torch.allclose(lp, flow.base.log_prob(z1) + total, rtol=1e-14, atol=0)
    # float32 cannot: the same sum in float32 is off by ~1e-3 (the reason for the case)
    assert abs(s1.float().sum().item() - total) > 1e-4


BASES = {
    "diag-fixed": lambda: nf.DiagGaussian(3, loc=[0.0, 1.0, -1.0], scale=[1.0, 2.0, 0.5]),
    "diag-trainable": lambda: nf.DiagGaussian(3, loc=0.5, scale=2.0, trainable=True),
    "uniform": lambda: nf.Uniform(3, low=[-1.0, 0.0, 2.0], high=[1.0, 3.0, 2.5]),
    "vonmises": lambda: nf.VonMises(3, loc=[0.0, 1.0, -2.0], concentration=[1.0, 4.0, 0.5]),
    "vonmises-trainable": lambda: nf.VonMises(3, loc=0.3, concentration=2.0, trainable=True),
    "circular-uniform": lambda: nf.CircularUniform(3),
    "product": lambda: nf.Product([nf.DiagGaussian(1), nf.CircularUniform(1), nf.Uniform(1)]),
    "conditional-diag": lambda: nf.ConditionalDiagGaussian(3, CTX, hidden_features=(8, 8)),
    "class-conditional": lambda: nf.ClassConditionalDiagGaussian(3, CTX),
}


@pytest.mark.parametrize("name", sorted(BASES))
def test_c10_every_base_moves_with_to(name):
    base = BASES[name]()
    jitter_(base, 0.1, torch.Generator().manual_seed(0))
    assert not _plain_tensor_attributes(base)
    base = base.to(F64)
    for k, t in list(base.named_parameters()) + list(base.named_buffers()):
        if t.is_floating_point():
            assert t.dtype == F64, k
    c = None if base.context_features is None else torch.randn(4, CTX, dtype=F64)
    z = base.sample(4, c)
    assert z.dtype == F64 and z.shape == (4, 3)
    assert base.log_prob(z, c).dtype == F64
    z2, lp = base.sample_and_log_prob(4, c)
    assert z2.dtype == F64 and lp.dtype == F64


def test_c10_uniform_double_samples_float64():
    u = nf.Uniform(2).double()
    assert u.sample(5).dtype == F64


# ------------------------------------------------------------------------------ C11
C11_PARAMS = [(n, dt) for n in CONDITIONAL_LAYERS for dt in (F32, F64)]


@pytest.mark.parametrize("name,dtype", C11_PARAMS,
                         ids=[f"{n}-{str(d)[6:]}" for n, d in C11_PARAMS])
def test_c11_conditional_sample_log_prob_rows_and_context_use(name, dtype):
    """C11 for every layer with a context (unconditional base matched to the domains):
    the sample's log-density equals log_prob (1e-4 float32), rows are independent, and
    the context changes the density."""
    flow = layer_flow(name, dtype=dtype, jitter=0.1)
    D = LAYER_BY_NAME[name].features
    g = torch.Generator().manual_seed(4)
    ctx = torch.randn(8, CTX, generator=g, dtype=F64).to(dtype)
    tol = 1e-4 if dtype == F32 else 1e-9
    with torch.no_grad():
        x, log_q = flow.sample_and_log_prob(1, ctx)
        assert x.shape == (1, 8, D) and log_q.shape == (1, 8)
        lp = flow.log_prob(x, ctx)
        assert (log_q - lp).abs().max() < tol
        x, lp = x[0], lp[0]
        rows = torch.cat([flow.log_prob(x[i:i + 1], ctx[i:i + 1]) for i in range(8)])
        assert (rows - lp).abs().max() < (1e-5 if dtype == F32 else 1e-12)
        assert (flow.log_prob(x, ctx + 1) - lp).abs().max() > 1e-3


@pytest.mark.parametrize("name", CONDITIONAL_LAYERS)
def test_c11_shape_contract(name):
    """sample(n, c) with c (C,) -> (n, D); with c (M, C) -> (n, M, D); log_prob accepts
    those back (with the broadcast context) and agrees with sample_and_log_prob."""
    flow = layer_flow(name, jitter=0.1)
    D = LAYER_BY_NAME[name].features
    with torch.no_grad():
        c1 = torch.randn(CTX, dtype=F64)
        one = flow.sample(5, c1)
        assert one.shape == (5, D)
        assert flow.log_prob(one, c1).shape == (5,)
        cm = torch.randn(3, CTX, dtype=F64)
        many, lq = flow.sample_and_log_prob(5, cm)
        assert many.shape == (5, 3, D) and lq.shape == (5, 3)
        assert (flow.log_prob(many, cm) - lq).abs().max() < 1e-9
        assert flow.sample(5, cm).shape == (5, 3, D)
        # a (1, C) context broadcasts over a (5,) batch
        assert flow.log_prob(one, c1[None]).shape == (5,)


def test_c11_sample_row_uses_its_own_context():
    """Sample i of sample(n, ctx (M, C)) depends on ctx[i] only: drawing with one context
    row reproduces that column under the same base noise."""
    flow = layer_flow("chain-ctx", jitter=0.2)
    cm = torch.randn(3, CTX, dtype=F64)
    torch.manual_seed(1)
    z = flow.base.sample(4 * 3)
    torch.manual_seed(1)
    x = flow.sample(4, cm)
    x_ref, _ = flow.transform.inverse(z, cm.repeat(4, 1))
    assert torch.allclose(x.reshape(12, -1), x_ref, atol=1e-12)
    x_col, _ = flow.transform.inverse(z.reshape(4, 3, -1)[:, 1], cm[1:2].expand(4, -1))
    assert torch.allclose(x[:, 1], x_col, atol=1e-12)


# ------------------------------------------------------------------------------ C12
class _CallCounter:
    """Counts calls of every submodule (the conditioners, MADEs, encoders, layers)."""

    def __init__(self, module, transforms=True):
        self.calls = []
        for name, m in module.named_modules():
            if transforms or not isinstance(m, Transform):
                m.register_forward_pre_hook(lambda *a, name=name: self.calls.append(name))

    @property
    def n(self):
        return len(self.calls)


@pytest.mark.parametrize("name", CONDITIONAL_LAYERS)
def test_c12_flow_context_errors_name_the_sizes(name):
    flow = layer_flow(name, dtype=F32, jitter=0.1)
    D = LAYER_BY_NAME[name].features
    x = torch.randn(8, D)
    calls = _CallCounter(flow)
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        flow.log_prob(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"context.*(8.*5|5.*8)"):
        flow.log_prob(x, torch.randn(5, 4))
    with pytest.raises((ValueError, TypeError), match="context"):
        flow.log_prob(x, None)
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        flow.sample(8, torch.randn(5, 3))
    with pytest.raises((ValueError, TypeError), match="context"):
        flow.sample(8)
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        flow.sample_and_log_prob(8, torch.randn(3))
    assert calls.n == 0  # validation happens before any computation
    # (d) of the case: the docs define sample(n, (M, C)) -> (n, M, D): valid, not an error
    assert flow.sample(8, torch.randn(5, 4)).shape == (8, 5, D)
    assert calls.n > 0


@pytest.mark.parametrize("name", CONDITIONAL_LAYERS)
def test_c12_layer_context_errors_name_the_sizes(name):
    """Every conditional layer validates its context up front, the same way."""
    spec = LAYER_BY_NAME[name]
    t = build(name, jitter=0.1, dtype=F32)
    x = torch.randn(8, spec.features)
    calls = _CallCounter(t, transforms=False)  # networks only: Inverse delegates by a call
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        t(x, torch.randn(8, 3))
    with pytest.raises(ValueError, match=r"context.*(8.*5|5.*8)"):
        t(x, torch.randn(5, 4))
    with pytest.raises((ValueError, TypeError), match="context"):
        t(x, None)
    with pytest.raises(ValueError, match=r"context.*4.*3"):
        t.inverse(x, torch.randn(8, 3))
    with pytest.raises((ValueError, TypeError), match="context"):
        t.inverse(x, None)
    assert calls.calls == [], calls.calls  # no conditioner / MADE / hypernetwork ran
    t(x, torch.randn(8, 4))
    assert calls.calls  # the counter does see the networks when they run


def test_c12_context_to_unconditional_flow_is_never_ignored():
    flow = small_flow(dtype=F32)
    x = torch.randn(8, 3)
    for f in (lambda: flow.log_prob(x, torch.randn(8, 4)), lambda: flow.sample(8, torch.randn(4)),
              lambda: flow.sample_and_log_prob(8, torch.randn(2, 4)),
              lambda: flow.transform(x, torch.randn(8, 4))):
        with pytest.raises(ValueError, match="unconditional"):
            f()
