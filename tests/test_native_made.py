"""The MADE's C kernel (``masked_kernel.c`` through ``normflux.nets.native_made``): its
products against float64 within the float32 GEMM error bound, on any mask and shape; the
MADE taking it; masks that are staircases; checkpoints whose hidden units are in another
order."""

from __future__ import annotations

import copy
import os
import shutil

import pytest
import torch

from normflux import Affine, MaskedAutoregressive
from normflux.nets import MADE, native_made

needs_kernel = pytest.mark.skipif(
    not native_made._kernel(),
    reason="the masked-layer kernel is not built here (no compiler or no AVX-512)")

# the kernel runs with one intra-op thread: conftest.py sets one for the whole suite

U = torch.finfo(torch.float32).eps / 2  # unit roundoff


def test_kernel_builds_where_avx512_and_a_compiler_exist():
    """On a CPU with AVX-512 and a C compiler the kernel is there (so that its tests run)."""
    try:
        avx512 = " avx512f " in open("/proc/cpuinfo").read().replace("\n", " ")
    except OSError:
        avx512 = False
    if (not avx512 or os.environ.get("NORMFLUX_NATIVE") == "0"
            or shutil.which(os.environ.get("CC", "cc")) is None):
        pytest.skip("no AVX-512, no C compiler, or the kernels are switched off")
    assert native_made._kernel()


def _gemm_bound(a, b, K, terms=0.0, result=0.0):
    """``gamma_K (|a| |b| + |terms|) + u |result|``: the error bound of a float32 sum of
    ``K`` terms, the products of ``a b`` and the added ``terms`` (Higham, Accuracy and
    Stability of Numerical Algorithms, 2nd ed., eq. 3.5), plus one rounding of the
    result itself."""
    gamma = K * U / (1 - K * U)
    return gamma * (a.abs() @ b.abs() + abs(terms)) + U * abs(result) + 1e-30


def _mask(kind, N, K, g):
    if kind == "staircase":  # a MADE's, units in order of degree
        d_out = torch.sort(torch.randint(1, 6, (N,), generator=g)).values
        d_in = torch.sort(torch.randint(1, 6, (K,), generator=g)).values
        return (d_out[:, None] >= d_in[None, :]).float()
    if kind == "random":
        return (torch.rand(N, K, generator=g) < 0.4).float()
    if kind == "zero":
        return torch.zeros(N, K)
    m = (torch.rand(N, K, generator=g) < 0.5).float()  # zero rows and a zero column block
    m[: N // 3] = 0
    m[:, K // 2:] = 0
    return m


def _layer_problem(M, K, N, kind, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).relu()  # a ReLU layer's input: its zeros matter
    w = torch.randn(N, K, generator=g)
    b = torch.randn(N, generator=g)
    return x, w, b, _mask(kind, N, K, g), torch.randn(M, N, generator=g)


SHAPES = [(16, 16, 128), (25, 128, 128), (1000, 128, 32), (37, 7, 45), (13 * 12 + 5, 33, 70)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["staircase", "random", "zero", "blocks"])
def test_layer_products_within_the_float32_gemm_bound(shape, kind):
    """One masked layer, forward (bias, a broadcast context term, then a ReLU when it is a
    hidden layer) and backward (input gradient, masked weight gradient, bias gradient),
    against float64: every entry within the float32 error bound of its sum, and masked
    weight entries exactly zero."""
    M, K, N = shape
    x, w, b, m, g = _layer_problem(M, K, N, kind, seed=M + K + N)
    wm = (w * m).double()
    pre = x.double() @ wm.t() + b.double()
    # the layer as the output layer (no ReLU) ...
    out, hs = native_made.forward(x, [(w, b, m)], None)
    assert len(hs) == 1 and hs[0].data_ptr() == x.data_ptr()
    assert ((out.double() - pre).abs() <= _gemm_bound(x.double(), wm.t(), K + 1, b.double(),
                                                      pre)).all()
    # ... and as a hidden layer with a context term, before a one-unit output layer
    e = torch.randn(1, N)
    pre_e = pre + e.double()
    _, hs = native_made.forward(x, [(w, b, m), (torch.ones(1, N), torch.zeros(1),
                                                torch.ones(1, N))], e)
    bound = _gemm_bound(x.double(), wm.t(), K + 2, b.double().abs() + e.double().abs(), pre_e)
    assert ((hs[1].double() - pre_e.relu()).abs() <= bound).all()
    g_x, g_e, (g_w, g_b) = native_made.backward(g, [x], [(w, b, m)], True, True)
    truth = g.double() @ wm
    assert ((g_x.double() - truth).abs() <= _gemm_bound(g.double(), wm, N, 0, truth)).all()
    assert g_e is g
    truth_w = (g.double().t() @ x.double()) * m.double()
    assert ((g_w.double() - truth_w).abs()
            <= _gemm_bound(g.double().t(), x.double(), M, 0, truth_w)).all()
    assert (g_w[m == 0] == 0).all()
    assert ((g_b.double() - g.double().sum(0)).abs() <= U * g.double().abs().sum(0) + 1e-30).all()


@needs_kernel
@pytest.mark.parametrize("M", [16, 29, 300])
def test_two_layers_match_autograd_in_float64(M):
    """A hidden layer and an output layer: values and every gradient against autograd on
    the same layers in float64 (relative 1e-5; float32 products of 20 and 40 terms), and
    the hidden gradient zero exactly where the hidden layer is (the ReLU's backward, as
    ``threshold_backward``)."""
    g = torch.Generator().manual_seed(M)
    x = torch.randn(M, 20, generator=g)
    layers = [(torch.randn(40, 20, generator=g), torch.randn(40, generator=g),
               _mask("random", 40, 20, g)),
              (torch.randn(9, 40, generator=g), torch.randn(9, generator=g),
               _mask("staircase", 9, 40, g))]
    layers[0][1][0] = -1e3  # hidden unit 0 is zero for every row
    out, hs = native_made.forward(x, layers, None)
    gy = torch.randn(out.shape, generator=g)
    g_x, _, grads = native_made.backward(gy, hs, layers, True, False)
    ps = [t.double().requires_grad_() for w, b, _ in layers for t in (w, b)]
    xd = x.double().requires_grad_()
    h = torch.relu(xd @ (ps[0] * layers[0][2].double()).t() + ps[1])
    ref = h @ (ps[2] * layers[1][2].double()).t() + ps[3]
    truth = torch.autograd.grad(ref, [xd, h, *ps], gy.double())
    assert ((out.double() - ref).abs() <= 1e-5 * (1 + ref.abs())).all()
    assert torch.equal(hs[1] > 0, h > 0) or ((hs[1] > 0) != (h > 0)).sum() <= 1
    for a, b in zip([g_x, *grads], [truth[0], *truth[2:]]):
        assert ((a.double() - b).abs() <= 1e-5 * (1 + b.abs())).all()
    # no gradient through a ReLU that was zero: hidden unit 0's bias and weights
    assert (hs[1][:, 0] == 0).all() and grads[1][0] == 0 and (grads[0][0] == 0).all()


def _made_float64_reference(made, x, c):
    """The MADE's layers op by op in float64 (a converted copy, its inputs converted)."""
    m64 = copy.deepcopy(made).double()
    xd = x.detach().double().requires_grad_()
    cd = None if c is None else c.detach().double().requires_grad_()
    out = m64.head(m64.hidden(xd, cd)).view(x.shape[0], made.features, made.params_per_feature)
    return m64, xd, cd, out


@needs_kernel
@pytest.mark.parametrize("context", [None, "rows", "one"])
def test_made_takes_the_kernel_and_matches_float64(monkeypatch, context):
    """A float32 MADE with gradients runs its layers in the kernel (one forward call per
    MADE), and its output and the gradients of the input, every parameter and the context
    match the float64 layers to 2e-5 relative."""
    torch.manual_seed(1)
    made = MADE(6, 3, (50, 40), context_features=None if context is None else 4,
                zero_init=False)
    calls = []
    real = native_made.forward
    monkeypatch.setattr(native_made, "forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(70, 6, requires_grad=True)
    c = None if context is None else torch.randn(70 if context == "rows" else 1, 4,
                                                 requires_grad=True)
    out = made(x, c)
    assert calls == [1]
    m64, xd, cd, ref = _made_float64_reference(made, x, c)
    assert ((out.double() - ref).abs() <= 2e-5 * (1 + ref.abs())).all()
    gy = torch.randn_like(out)
    wrt = [x, *made.parameters()] + ([] if c is None else [c])
    wrt64 = [xd, *m64.parameters()] + ([] if cd is None else [cd])
    for a, b in zip(torch.autograd.grad(out, wrt, gy), torch.autograd.grad(ref, wrt64, gy.double())):
        assert ((a.double() - b).abs() <= 2e-5 * (1 + b.abs())).all()


@needs_kernel
def test_made_leaves_the_kernel_where_it_does_not_apply(monkeypatch):
    """float64, fewer than 16 rows, no gradients, a transposed output (spline layers) and
    more than one intra-op thread take torch's GEMMs (torch.compile's tracing too:
    ``tests/test_compile.py``)."""
    calls = []
    real = native_made.forward
    monkeypatch.setattr(native_made, "forward", lambda *a: calls.append(1) or real(*a))
    made = MADE(4, 2, (8, 8), zero_init=False)
    made(torch.randn(16, 4, requires_grad=True))
    assert calls == [1]
    made(torch.randn(15, 4, requires_grad=True))
    made.double()(torch.randn(40, 4, dtype=torch.float64, requires_grad=True))
    made.float()
    with torch.no_grad():
        made(torch.randn(40, 4))
    MADE(4, 2, (8, 8), transposed_output=True)(torch.randn(40, 4, requires_grad=True))
    torch.set_num_threads(2)
    try:
        made(torch.randn(40, 4, requires_grad=True))
    finally:
        torch.set_num_threads(1)
    assert calls == [1]


def test_made_masks_are_staircases():
    """Hidden units in order of degree: every mask of a MADE with a sequential order is a
    staircase (each row's ones a prefix, longer down the rows), which the kernel
    multiplies panel by panel; B2's 128 x 128 mask needs 65 % of its products in panels of
    32 outputs."""
    made = MADE(16, 2, (128, 128))
    for lin in (made.first, made.body[0], made.head):
        m = lin.mask
        ones = m.sum(1).long()
        assert torch.equal(m, (torch.arange(m.shape[1])[None, :] < ones[:, None]).float())
        assert (ones.diff() >= 0).all()
    hidden = made.body[0].mask
    extents = [int(hidden[p:p + 32].sum(1).max()) for p in range(0, 128, 32)]
    assert extents == [36, 72, 96, 128] and sum(extents) * 32 / 128 ** 2 == pytest.approx(0.648, abs=1e-3)


def _legacy_state(made):
    """``made``'s state dict with the hidden units as earlier builds of normflux 0.1.0 laid
    them out: unit ``k`` of degree ``1 + (k mod (D - 1))``, cycling through the degrees."""
    D = made.features
    sd = {k: v.clone() for k, v in made.state_dict().items()}
    perms = []
    for d in made._hidden_deg:
        legacy = torch.arange(d.numel()) % (D - 1) + 1
        # legacy unit j is the sorted layout's unit inv[j] (same degree, same rank)
        perms.append(torch.argsort(torch.argsort(legacy, stable=True)))
    names = ["first"] + [f"body.{i}" for i, m in enumerate(made.body)
                         if isinstance(m, torch.nn.Linear)] + ["head"]
    for layer, name in enumerate(names):
        rows = perms[layer] if layer < len(perms) else None
        cols = perms[layer - 1] if layer else None
        for key in ("weight", "mask"):
            t = sd[f"{name}.{key}"]
            t = t[rows] if rows is not None else t
            sd[f"{name}.{key}"] = t[:, cols] if cols is not None else t
        if rows is not None:
            sd[f"{name}.bias"] = sd[f"{name}.bias"][rows]
    return sd


@pytest.mark.parametrize("order", ["sequential", "random"])
def test_a_checkpoint_with_units_cycling_through_degrees_still_samples(order):
    """A state dict saved before the hidden units were sorted (their degrees cycling):
    loaded, the MADE computes the same function, and its sequential passes (the inverse's
    prefixes, ordered by the degrees the loaded masks give) agree with its forward, so a
    MAF built on it samples what it evaluates."""
    torch.manual_seed(2)
    made = MADE(5, 2, (13, 11), order=order, zero_init=False,
                generator=torch.Generator().manual_seed(0))
    x = torch.randn(32, 5)
    with torch.no_grad():
        expected = made(x)
    legacy = _legacy_state(made)
    assert not torch.equal(legacy["first.mask"], made.first.mask)
    fresh = MADE(5, 2, (13, 11), order=order, zero_init=False)
    fresh.load_state_dict(legacy)
    with torch.no_grad():
        assert torch.allclose(fresh(x), expected, atol=1e-5)
        params = fresh.sequential_params()
        for i in range(5):
            assert torch.allclose(params(x, i), expected[:, i], atol=1e-5)
    t = MaskedAutoregressive(Affine(), features=5, hidden_features=(13, 11))
    sd = t.made.state_dict()
    t.made.load_state_dict(_legacy_state(t.made) | {"degrees": sd["degrees"]})
    with torch.no_grad():
        for p in t.parameters():
            p.normal_(0, 0.3)
    with torch.no_grad():
        z = torch.randn(20, 5)
        y, _ = t.inverse(z)
        back, _ = t(y)
    assert torch.allclose(back, z, atol=1e-4)


def _both_paths(made, x, c=None):
    """The MADE's output with the kernel (one thread) and with torch's GEMMs (two)."""
    out = made(x, c)
    torch.set_num_threads(2)
    try:
        ref = made(x, c)
    finally:
        torch.set_num_threads(1)
    return out, ref


@needs_kernel
@pytest.mark.parametrize("where", ["bias", "input"])
def test_a_nan_passes_the_relu_as_in_torch(where):
    """relu(NaN) is NaN, as torch.relu's (x86's max would return the 0): a NaN hidden bias
    or input reaches the same outputs, and the loss, on both paths."""
    torch.manual_seed(0)
    made = MADE(4, 2, (32, 32), zero_init=False)
    x = torch.randn(16, 4)
    if where == "bias":
        with torch.no_grad():
            made.body[0].bias[5] = float("nan")
    else:
        x[3, 2] = float("nan")
    out, ref = _both_paths(made, x.requires_grad_())
    assert out.isnan().any() and torch.equal(out.isnan(), ref.isnan())


@needs_kernel
@pytest.mark.parametrize("mask", ["bool", "float64", "broadcast"])
def test_masks_the_kernel_cannot_read_take_torch_ops(monkeypatch, mask):
    """A mask that is not a float32 tensor of its weight's shape (assigned by hand, or by
    load_state_dict(assign=True)) is not handed to the kernel: the MADE computes what
    torch's ops compute (or raises their error)."""
    torch.manual_seed(0)
    made = MADE(8, 2, (64, 64), zero_init=False)
    lin = made.body[0]
    if mask == "bool":
        lin.mask = lin.mask.bool()
    elif mask == "float64":
        lin.mask = lin.mask.double()
    else:
        lin.mask = torch.ones(64)
    calls = []
    real = native_made.forward
    monkeypatch.setattr(native_made, "forward", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(64, 8, requires_grad=True)
    if mask == "float64":
        with pytest.raises(RuntimeError):
            made(x)
    else:
        out, ref = _both_paths(made, x)
        assert torch.equal(out, ref)
    assert calls == []


@needs_kernel
def test_a_mask_changed_before_the_backward_is_a_version_error():
    """The node keeps the masks it multiplied with: changing one in place before the
    backward raises autograd's version error instead of a gradient of another layer."""
    made = MADE(4, 2, (32, 32), zero_init=False)
    x = torch.randn(16, 4, requires_grad=True)
    out = made(x)
    with torch.no_grad():
        made.body[0].mask.zero_()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()


@needs_kernel
def test_weights_the_mask_excludes_never_reach_the_output():
    """An inf or NaN weight where the mask is zero is not part of the model: the kernel's
    output and gradients stay finite (W * M would spread NaN)."""
    torch.manual_seed(0)
    made = MADE(4, 2, (32, 32), zero_init=False)
    lin = made.body[0]
    with torch.no_grad():
        lin.weight[lin.mask == 0] = float("nan")
        made.first.weight[made.first.mask == 0] = float("inf")
    x = torch.randn(16, 4, requires_grad=True)
    out = made(x)
    out.sum().backward()
    assert out.isfinite().all() and x.grad.isfinite().all()
