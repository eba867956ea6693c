"""Tests of normflux.models: the registry, build(**config) round trips, domains, Standardize."""

import math

import pytest
import torch

from normflux import models
from normflux.distributions import CircularUniform, DiagGaussian, Product, Uniform
from normflux.testing import check_transform
from normflux.transforms import CircularShift, Coupling, Permutation


def _perturb(flow, scale=0.1, seed=0):
    """Move the weights away from the identity initialisation (zero last layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return flow


@pytest.mark.parametrize("name", ["nsf", "realnvp"])
@pytest.mark.parametrize("features", [2, 5])
def test_build_shapes_and_contract(name, features):
    flow = _perturb(models.build(name, features, layers=3, hidden=(16, 16)))
    x = torch.randn(7, features)
    assert flow.log_prob(x).shape == (7,)
    assert flow.sample(4).shape == (4, features)
    check_transform(flow.transform, x)
    assert isinstance(flow.base, DiagGaussian)


def test_registry_lists_known_names_on_error():
    with pytest.raises(ValueError, match="known models: .*nsf.*realnvp"):
        models.build("no-such-flow", 2)
    assert {"nsf", "realnvp"} <= set(models.MODELS)


def test_register_adds_one_entry():
    @models.register("test-identity-coupling")
    def _arch(spec):
        return models.MODELS["realnvp"](spec)
    try:
        flow = models.build("test-identity-coupling", 3, layers=2)
        assert flow.config["name"] == "test-identity-coupling"
        assert flow.log_prob(torch.randn(2, 3)).shape == (2,)
    finally:
        del models.MODELS["test-identity-coupling"]


def test_config_rebuilds_same_function():
    flow = _perturb(models.build("nsf", 4, context=2, layers=3, hidden=(16,), bins=5,
                                 tail_bound=4.0, standardize=True, seed=3))
    cfg = flow.config
    assert cfg["name"] == "nsf" and cfg["features"] == 4 and cfg["context"] == 2
    assert cfg["hidden"] == [16] and cfg["bins"] == 5 and cfg["tail_bound"] == 4.0
    # config is plain data (JSON-able)
    import json
    assert json.loads(json.dumps(cfg)) == cfg
    twin = models.build(**cfg)
    twin.load_state_dict(flow.state_dict(), strict=True)
    x, c = torch.randn(6, 4), torch.randn(6, 2)
    torch.testing.assert_close(twin.log_prob(x, c), flow.log_prob(x, c), rtol=0, atol=0)


def test_same_seed_same_initial_weights_and_global_rng_untouched():
    state = torch.random.get_rng_state()
    a = models.build("nsf", 5, layers=2, seed=11)
    b = models.build("nsf", 5, layers=2, seed=11)
    c = models.build("nsf", 5, layers=2, seed=12)
    assert torch.equal(torch.random.get_rng_state(), state)
    for (k, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), k
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(),
                                                     c.state_dict().values()))


def test_nsf_layout_alternating_masks_and_permutations():
    flow = models.build("nsf", 2, layers=4)
    couplings = [t for t in flow.transform if isinstance(t, Coupling)]
    assert len(couplings) == 4
    masks = [c.mask.tolist() for c in couplings]
    assert masks[0] == [False, True] and masks[1] == [True, False]   # flipped between layers
    assert not any(isinstance(t, Permutation) for t in flow.transform)  # D = 2: masks suffice
    flow5 = models.build("nsf", 5, layers=4)
    assert sum(isinstance(t, Permutation) for t in flow5.transform) == 3
    flow5r = models.build("nsf", 5, layers=2, permutation="reverse")
    perm = [t for t in flow5r.transform if isinstance(t, Permutation)][0]
    assert perm.perm.tolist() == [4, 3, 2, 1, 0]


def test_cylinder_model_has_circular_shift_and_product_base():
    flow = _perturb(models.build("nsf", 2, domains=("real", "circle"), layers=4))
    assert sum(isinstance(t, CircularShift) for t in flow.transform) == 3
    assert isinstance(flow.base, Product)
    assert [type(p) for p in flow.base.parts] == [DiagGaussian, CircularUniform]
    assert flow.config["domains"] == ["real", "circle"]
    x = flow.sample(500).detach()
    assert float(x[:, 1].min()) >= -math.pi and float(x[:, 1].max()) < math.pi
    # periodic in the angle: log p(x, phi) == log p(x, phi + 2 pi)
    pts = torch.stack([torch.randn(50), torch.rand(50) * 6 - 3], 1)
    shifted = pts + torch.tensor([0.0, 2 * math.pi])
    torch.testing.assert_close(flow.log_prob(pts), flow.log_prob(shifted), atol=1e-4, rtol=0)


def test_mixed_domains_are_tracked_through_permutations():
    doms = ["real", "circle", ("interval", 0.0, 1.0), "real", "circle"]
    flow = _perturb(models.build("nsf", 5, domains=doms, layers=4, hidden=(16,), seed=1),
                    scale=0.3)
    x = flow.sample(2000).detach()
    assert float(x[:, 2].min()) >= 0.0 and float(x[:, 2].max()) <= 1.0
    for j in (1, 4):
        assert float(x[:, j].min()) >= -math.pi and float(x[:, j].max()) < math.pi
    mild = _perturb(models.build(**flow.config), scale=0.1)
    check_transform(mild.transform, mild.sample(16).detach())
    kinds = {type(p) for p in flow.base.parts}
    assert kinds == {DiagGaussian, CircularUniform, Uniform}
    lp = flow.log_prob(x[:100])
    assert bool(torch.isfinite(lp).all())


def test_realnvp_rejects_circle():
    with pytest.raises(ValueError, match="real coordinates only"):
        models.build("realnvp", 2, domains=("real", "circle"))


@pytest.mark.parametrize("bad,match", [
    (dict(features=1), "at least 2 features"), (dict(layers=0), "layers"),
    (dict(context=0), "context"), (dict(domains=["real", "sphere"]), "sphere"),
    (dict(permutation="spiral"), "permutation"), (dict(unknown_option=3), "unknown_option"),
    # accepted before (by the architectures that ignore them, or read as 3.0)
    (dict(name="maf", bins=0), "bins must be >= 1"), (dict(bins=-1), "bins must be >= 1"),
    (dict(name="planar", hidden=(-3,)), "hidden must be >= 1"),
    (dict(name="planar", hidden=()), "hidden needs at least one width"),
    (dict(tail_bound="3"), "tail_bound must be a finite number"),
    (dict(tail_bound=0), "tail_bound must be > 0")])
def test_bad_arguments_raise_value_error(bad, match):
    kw = dict(name="nsf", features=3, layers=2)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        models.build(**kw)


def test_standardize_layer_contract_and_ladj():
    layer = models.Standardize(3).set_stats(torch.randn(100, 3) * torch.tensor([1.0, 2.0, 5.0])
                                            + 3)
    x = torch.randn(8, 3)
    z, ladj = layer(x)
    torch.testing.assert_close(z, (x - layer.mean) / layer.std)
    torch.testing.assert_close(ladj, (-torch.log(layer.std).sum()).expand(8))
    check_transform(layer, x)
    # circle coordinates are never rescaled
    circ = models.Standardize(2, models.domains_from_config(["real", "circle"], 2))
    circ.set_stats(torch.randn(50, 2) * 4)
    assert circ.mean[1] == 0 and circ.std[1] == 1 and circ.std[0] != 1


def test_standardization_makes_nll_scale_equivariant():
    """log p_{a x + b}(a x + b) = log p_x(x) - D log a when both models are the same flow
    behind their own standardisation."""
    data = torch.randn(300, 3) @ torch.tensor([[1.0, 0.3, 0.0], [0.0, 1.0, 0.5], [0.0, 0.0, 1.0]])
    a, b = 7.0, -2.0
    f1 = _perturb(models.build("nsf", 3, layers=2, standardize=True))
    f2 = models.build(**f1.config)
    f2.load_state_dict(f1.state_dict())
    models.fit_standardization(f1, data)
    models.fit_standardization(f2, a * data + b)
    x = data[:20]
    torch.testing.assert_close(f2.log_prob(a * x + b), f1.log_prob(x) - 3 * math.log(a),
                               atol=1e-4, rtol=1e-5)


def test_context_standardization():
    flow = _perturb(models.build("nsf", 2, context=1, layers=2))
    twin = models.build(**flow.config)
    twin.load_state_dict(flow.state_dict())
    ctx = torch.randn(200, 1) * 10 + 50
    flow.context_mean.fill_(0)  # sanity: identity before fitting
    with pytest.raises(ValueError, match="standardize=False"):
        models.fit_standardization(flow, torch.randn(200, 2), ctx)
    flow.context_mean.copy_(ctx.mean(0))
    flow.context_std.copy_(ctx.std(0))
    x, c = torch.randn(5, 2), ctx[:5]
    torch.testing.assert_close(flow.log_prob(x, c),
                               twin.log_prob(x, (c - ctx.mean(0)) / ctx.std(0)))
    with pytest.raises(ValueError, match="context"):
        flow.log_prob(x, torch.randn(5, 3))


import normflux as nf  # noqa: E402


@pytest.mark.parametrize("permutation", ["reverse", "none"])  # random: by chance
@pytest.mark.parametrize("features", [2, 3, 4, 5])
def test_coupling_stacks_transform_every_coordinate(permutation, features):
    """Regression: with a reversal and even D, flipped masks cancelled the reversal, so
    the same coordinates were transformed by every layer. Every input coordinate must be
    transformed by some layer (its own diagonal Jacobian entry moves)."""
    import normflux.models as M
    flow = M.build("realnvp", features, layers=4, hidden=(8, 8), permutation=permutation)
    touched = torch.zeros(features, dtype=torch.bool)
    # trace which original coordinates each coupling transforms
    perm = torch.arange(features)
    for t in flow.transform:
        if isinstance(t, nf.Coupling):
            touched[perm[t.idx_b]] = True
        elif isinstance(t, nf.Permutation):
            perm = perm[t.perm]
    assert touched.all(), touched


@pytest.mark.parametrize("name", ["maf", "iaf", "nsf-ar", "planar", "radial", "sylvester",
                                  "nsf", "realnvp"])
@pytest.mark.parametrize("context", [None, 3])
def test_every_architecture_builds_inverts_and_rebuilds(name, context):
    """Issue 3: every named architecture, conditional or not: sample/log_prob agree, the
    whole model passes the harness, and build(**config) + state_dict reproduces it."""
    flow = models.build(name, 4, context=context, layers=3, hidden=(16, 16), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    c = torch.randn(6, 3) if context else None
    x = torch.randn(6, 4)
    flow64 = models.build(**flow.config).double()
    flow64.load_state_dict(flow.state_dict())
    check_transform(flow64.transform, x.double(), None if c is None else c.double())
    with torch.no_grad():
        s, lq = flow.sample_and_log_prob(6, None if c is None else c[0])
        assert (flow.log_prob(s, None if c is None else c[0]) - lq).abs().max() < 1e-4
        rebuilt = models.build(**flow.config)
        rebuilt.load_state_dict(flow.state_dict(), strict=True)
        assert torch.equal(rebuilt.log_prob(x, c), flow.log_prob(x, c))


def test_autoregressive_models_use_the_papers_mixing():
    maf = models.build("maf", 4, layers=3, permutation="reverse")
    kinds = [type(t).__name__ for t in maf.transform]
    assert kinds == ["MaskedAutoregressive", "Permutation"] * 2 + ["MaskedAutoregressive"]
    nsf_ar = models.build("nsf-ar", 4, layers=3)
    assert [type(t).__name__ for t in nsf_ar.transform] == \
        ["MaskedAutoregressive", "LULinear"] * 2 + ["MaskedAutoregressive"]
    iaf = models.build("iaf", 4, layers=2)
    assert isinstance(iaf.transform[0], nf.Inverse)
    circ = models.build("nsf-ar", 2, domains=["real", "circle"], layers=2)
    assert [type(t).__name__ for t in circ.transform] == \
        ["MaskedAutoregressive", "CircularShift", "MaskedAutoregressive"]
    with pytest.raises(ValueError, match="real coordinates only"):
        models.build("maf", 2, domains=["real", "circle"])
