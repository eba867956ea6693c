"""LULinear, ActNorm, BatchNorm: harness, cached inverse, cases C06 and C07."""

import io

import pytest
import torch
from helpers import jitter_

import normflux as nf
from normflux.testing import check_transform


def _jitter(module, scale=0.3, seed=0):
    return jitter_(module, scale, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_harness_lu_linear(dtype):
    t = _jitter(nf.LULinear(5, permutation=torch.randperm(5, generator=torch.Generator().manual_seed(0))))
    t = t.to(dtype)
    check_transform(t, torch.randn(7, 5, dtype=dtype))


def test_lu_linear_matches_its_matrix_and_slogdet():
    t = _jitter(nf.LULinear(4)).double()
    x = torch.randn(3, 4, dtype=torch.float64)
    z, ladj = t(x)
    W = t.weight()
    assert torch.allclose(z, x @ W.T + t.bias, atol=1e-12)
    assert torch.allclose(ladj, torch.linalg.slogdet(W)[1].expand(3), atol=1e-12)


def test_lu_cached_inverse_invalidated_by_step_load_and_data_writes():
    torch.manual_seed(0)
    t = _jitter(nf.LULinear(4)).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        z, _ = t(x)
        assert (t.inverse(z)[0] - x).abs().max() < 1e-5
    assert t._cache is not None
    # optimizer step
    opt = torch.optim.SGD(t.parameters(), lr=0.01)
    t(x)[0].pow(2).sum().backward()
    opt.step()
    with torch.no_grad():
        z, _ = t(x)
        assert (t.inverse(z)[0] - x).abs().max() < 1e-5
        # write through .data (no version bump)
        t.upper.data.add_(0.7)
        z, _ = t(x)
        assert (t.inverse(z)[0] - x).abs().max() < 1e-5
        # load a state dict
        other = _jitter(nf.LULinear(4), seed=5)
        t.load_state_dict(other.state_dict())
        z, _ = t(x)
        assert (t.inverse(z)[0] - x).abs().max() < 1e-5


def test_harness_actnorm_vectors_and_images():
    a = nf.ActNorm(3)
    a(torch.randn(64, 3) * 4 + 1)  # initialise
    check_transform(a, torch.randn(6, 3))
    b = nf.ActNorm(2)
    b(torch.randn(8, 2, 3, 3) * 2)
    check_transform(b, torch.randn(4, 2, 3, 3))


def test_actnorm_initialisation_standardises():
    torch.manual_seed(0)
    x = torch.randn(512, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([2.0, -3.0, 0.0])
    a = nf.ActNorm(3)
    z, ladj = a(x)
    assert torch.allclose(z.mean(0), torch.zeros(3), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(3), atol=1e-4)
    assert torch.allclose(ladj, -torch.log(x.std(0, unbiased=False)).sum().expand(512), atol=1e-4)


def test_c06_degenerate_first_batches():
    # (a) batch of one: finite, unit scale
    a = nf.ActNorm(3)
    y, l = a(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.isfinite(y).all() and torch.isfinite(l).all()
    # (b) channel 0 constant: finite and |log-scale| <= log(1e3)
    b = nf.ActNorm(3)
    y, l = b(torch.tensor([[1.0, 2, 3], [1, 5, 7], [1, -1, 0]]))
    assert torch.isfinite(y).all() and torch.isfinite(l).all()
    assert b.log_scale[0].abs() <= torch.log(torch.tensor(1e3))
    # (c) first call is the inverse: finite
    c = nf.ActNorm(3)
    x, l = c.inverse(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.isfinite(x).all() and torch.isfinite(l).all()


def test_c06_sharded_initialisation_equals_full_batch():
    """Data-parallel init: summing the shards' statistics gives the 64-batch parameters."""
    torch.manual_seed(0)
    x = torch.randn(64, 3) * 3 + 1
    full = nf.ActNorm(3)
    full.initialize(x)
    sharded = nf.ActNorm(3)
    stats = [nf.ActNorm.statistics(s) for s in x.split(32)]
    summed = [sum(parts) for parts in zip(*stats)]
    sharded.initialize_from_statistics(*summed)
    assert torch.allclose(full.loc, sharded.loc, atol=1e-6)
    assert torch.allclose(full.log_scale, sharded.log_scale, atol=1e-6)


def test_c07_initialised_state_survives_save_load():
    torch.manual_seed(0)
    a = nf.ActNorm(3)
    a(5 * torch.randn(64, 3) + 2)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    probe = 100 * torch.randn(16, 3) - 50
    for direction in ("forward", "inverse"):
        b = nf.ActNorm(3)
        buf.seek(0)
        b.load_state_dict(torch.load(buf, weights_only=True))
        fa = getattr(a, direction)
        fb = getattr(b, direction)
        ya, la = fa(probe)
        yb, lb = fb(probe)
        assert torch.equal(ya, yb) and torch.equal(la, lb)


def test_batchnorm_eval_is_exact_bijection():
    torch.manual_seed(0)
    bn = nf.BatchNorm(3)
    for _ in range(20):
        bn(torch.randn(128, 3) * 2 + 1)
    assert torch.allclose(bn.running_mean, torch.ones(3), atol=0.3)
    bn.eval()
    _jitter(bn, 0.2)
    check_transform(bn, torch.randn(6, 3))


def test_batchnorm_training_uses_batch_statistics():
    bn = nf.BatchNorm(2)
    x = torch.randn(256, 2) * 3 + 4
    z, ladj = bn(x)
    assert torch.allclose(z.mean(0), torch.zeros(2), atol=1e-5)
    assert torch.allclose(ladj[0], -0.5 * torch.log(x.var(0, unbiased=False) + bn.eps).sum(), atol=1e-5)
    with pytest.raises(ValueError, match="batch size"):
        bn(torch.randn(1, 2))


def test_unconditional_layers_reject_context():
    for t in (nf.LULinear(2), nf.ActNorm(2), nf.BatchNorm(2)):
        with pytest.raises(ValueError, match="context"):
            t(torch.randn(3, 2), torch.randn(3, 4))


def test_permutation_load_rederives_the_inverse_and_checks_perm():
    """A loaded perm without (or with a stale) inv_perm still inverts exactly; a loaded
    perm that is not a permutation is rejected by name."""
    a, b = nf.Permutation([2, 0, 3, 1]), nf.Permutation.reverse(4)
    state = {"perm": a.perm.clone(), "inv_perm": torch.arange(4)}  # stale inverse
    b.load_state_dict(state)
    x = torch.randn(3, 4)
    assert torch.equal(b.inverse(b(x)[0])[0], x) and torch.equal(b(x)[0], a(x)[0])
    c = nf.Permutation.reverse(4)
    c.load_state_dict({"perm": a.perm.clone()}, strict=False)
    assert torch.equal(c.inverse(c(x)[0])[0], x)
    with pytest.raises(ValueError, match="not a permutation"):
        nf.Permutation.reverse(4).load_state_dict({"perm": torch.tensor([0, 0, 1, 2]),
                                                   "inv_perm": torch.arange(4)})
