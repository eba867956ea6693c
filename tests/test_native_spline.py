"""The spline's C kernel: its build, its precision, its layouts and its fallbacks.

``tests/test_fused_spline.py`` runs the fused spline's equivalence tests (values and every
derivative order against the reference) on the kernel too; these are the kernel's own.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from normflux.transforms import native_spline
from normflux.transforms.fused_spline import _reference, fused_rq_spline
from normflux.transforms.splines import spline_knots

FLOORS = (1e-3, 1e-3, 1e-3)
needs_kernel = pytest.mark.skipif(not native_spline.available(),
                                  reason="the spline's C kernel did not build here")


def _problem(K=8, B=400, n=5, seed=0, scale=1.5, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, n, generator=g, dtype=torch.float64) * 2.5).to(dtype)
    # batch-minor parameters: memory (n, P, B), as a conditioner's transposed output
    p = (torch.randn(n, 3 * K - 1, B, generator=g, dtype=torch.float64) * scale).to(dtype)
    p = p.permute(2, 0, 1)
    low = torch.linspace(-3, -2, n, dtype=torch.float64).to(dtype)
    high = torch.linspace(2, 3, n, dtype=torch.float64).to(dtype)
    return x, p, low, high


def _values_and_grads(fn, x, p, low, high, gy, gl, dtype):
    x = x.detach().to(dtype).requires_grad_()
    p = p.detach().to(dtype).requires_grad_()
    y, lad = fn(x, p, low.to(dtype), high.to(dtype))
    gx, gp = torch.autograd.grad((y, lad), (x, p), (gy.to(dtype), gl.to(dtype)))
    return [t.detach().double() for t in (y, lad, gx, gp)]


def test_kernel_builds_where_a_compiler_exists():
    if os.environ.get("NORMFLUX_NATIVE") == "0" or shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler, or the kernel is switched off")
    assert native_spline.available()


@needs_kernel
@pytest.mark.parametrize("inverse", [False, True])
def test_float32_results_are_correctly_rounded(inverse):
    """Computed in double and rounded once: in float32 the kernel's y, ladj and gradients
    are within 2 ulp (relative, or absolute below 1) of the float64 reference, where the
    float32 reference is off by hundreds."""
    K = 8
    x, p, low, high = _problem(K)
    g = torch.Generator().manual_seed(1)
    gy, gl = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    truth = _values_and_grads(
        lambda x, p, lo, hi: _reference(x, p, lo, hi, K, *FLOORS, inverse), x, p, low, high, gy,
        gl, torch.float64)
    kernel = _values_and_grads(
        lambda x, p, lo, hi: fused_rq_spline(x, p, lo, hi, bins=K, inverse=inverse), x, p, low,
        high, gy, gl, torch.float32)
    ref32 = _values_and_grads(
        lambda x, p, lo, hi: _reference(x, p, lo, hi, K, *FLOORS, inverse), x, p, low, high, gy,
        gl, torch.float32)
    ulp = torch.finfo(torch.float32).eps
    for name, a, b, r in zip(("y", "ladj", "grad x", "grad params"), kernel, truth, ref32):
        err = ((a - b).abs() / (b.abs() + 1)).max().item()
        assert err < 2 * ulp, f"{name}: {err / ulp:.1f} ulp"
        assert ((r - b).abs() / (b.abs() + 1)).max().item() > 10 * err  # the point of it


@needs_kernel
@pytest.mark.parametrize("layout", ["batch-minor", "contiguous", "strided view", "3-d input"])
def test_any_strides_give_the_same_results(layout):
    K = 6
    x, p, low, high = _problem(K, B=37, n=3, dtype=torch.float64)
    if layout == "contiguous":
        p = p.contiguous()
    elif layout == "strided view":  # every other row / column of larger tensors
        p = torch.stack([p, p], 1).flatten(0, 1)[1::2]
        x = torch.stack([x, x], 2).flatten(1)[:, ::2]
        assert not p.is_contiguous() and not x.is_contiguous() and p.stride(0) == 2 * 3 * 17
    elif layout == "3-d input":
        x, p = x.view(37, 1, 3), p.unsqueeze(1)
    x, p = x.detach().requires_grad_(), p.detach().requires_grad_()
    y, lad = fused_rq_spline(x, p, low, high, bins=K)
    yr, lr = _reference(x, p, low, high, K, *FLOORS, False)
    assert y.shape == x.shape and (y - yr).abs().max() < 1e-12 and (lad - lr).abs().max() < 1e-12
    # a broadcast (stride-0) output gradient, as from .sum()
    g = torch.autograd.grad(y.sum() + lad.sum(), (x, p))
    gr = torch.autograd.grad(yr.sum() + lr.sum(), (x, p))
    assert all((a - b).abs().max() < 1e-11 for a, b in zip(g, gr))



@needs_kernel
@pytest.mark.parametrize("inverse", [False, True])
@pytest.mark.parametrize("K", [2, 3, 8, 11])
@pytest.mark.parametrize("B", [1, 32, 77])
def test_every_bin_count_and_tile_shape_matches_the_reference(K, B, inverse):
    """The kernel's paths agree with the float64 reference, values and gradients: the
    default K = 8 (its bin loops unrolled) and any other K; whole and partial tiles of 32
    lanes, vectors of 8 (the saved rows read in place, or through scratch rows); the
    batch-minor and the contiguous parameter layouts."""
    x, p, low, high = _problem(K, B=B, n=3, seed=K + B, dtype=torch.float64)
    x[0, 0] = 3.5  # one element outside the box: the identity, no parameter gradient
    g = torch.Generator().manual_seed(7)
    gy, gl = (torch.randn(x.shape, generator=g, dtype=torch.float64) for _ in range(2))
    truth = _values_and_grads(
        lambda x, p, lo, hi: _reference(x, p, lo, hi, K, *FLOORS, inverse), x, p, low, high, gy,
        gl, torch.float64)
    for params in (p, p.contiguous()):
        got = _values_and_grads(
            lambda x, p, lo, hi: fused_rq_spline(x, p, lo, hi, bins=K, inverse=inverse), x,
            params, low, high, gy, gl, torch.float64)
        for name, a, b in zip(("y", "ladj", "grad x", "grad params"), got, truth):
            assert ((a - b).abs() / (b.abs() + 1)).max() < 1e-11, name

@needs_kernel
def test_round_trip_near_knots_float32():
    """inverse(forward(x)) returns x to a few ulp also on and next to the knots."""
    K = 8
    _, p, low, high = _problem(K, B=1, n=1, scale=3.0)
    p = p[:1].expand(2000, 1, 3 * K - 1)
    xk, _, _ = spline_knots(p[:1].double(), low[:1].double(), high[:1].double(), bins=K)
    knots = xk.flatten().float()
    x = torch.cat([knots + d * 1e-6 for d in range(-5, 6)] + [torch.linspace(-3.5, 3.5, 1901)])
    x = x[:2000, None]
    lo, hi = low[:1], high[:1]
    y, lf = fused_rq_spline(x, p, lo, hi, bins=K)
    xr, li = fused_rq_spline(y, p, lo, hi, bins=K, inverse=True)
    assert torch.isfinite(xr).all() and torch.isfinite(li).all()
    eps = torch.finfo(torch.float32).eps
    assert ((xr - x).abs() <= 4 * eps * (x.abs() + 1) * (1 + (-lf).exp())).all()
    # both directions are the exact (float64) maps at their float32 inputs, to 2 ulp
    args = (p.double(), lo.double(), hi.double(), K, *FLOORS)
    for got, want in zip((y, lf, xr, li), _reference(x.double(), *args, False)
                         + _reference(y.double(), *args, True)):
        assert ((got - want).abs() <= 2 * eps * (want.abs() + 1)).all()


@needs_kernel
def test_empty_and_single_element_batches():
    K = 4
    x, p, low, high = _problem(K, B=1, n=1, dtype=torch.float64)
    for B in (0, 1):
        xx, pp = x.expand(B, 1).clone().requires_grad_(), p.expand(B, 1, 3 * K - 1)
        pp = pp.clone().requires_grad_()
        y, lad = fused_rq_spline(xx, pp, low, high, bins=K)
        yr, lr = _reference(xx, pp, low, high, K, *FLOORS, False)
        assert y.shape == (B, 1) and torch.allclose(y, yr) and torch.allclose(lad, lr)
        (y.sum() + lad.sum()).backward()
        assert pp.grad.shape == pp.shape


@needs_kernel
def test_concurrent_calls_from_threads():
    K = 8
    x, p, low, high = _problem(K, B=256, n=4)
    want = fused_rq_spline(x, p, low, high, bins=K)
    out: list = [None] * 4

    def work(i):
        out[i] = fused_rq_spline(x, p, low, high, bins=K)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(o[0], want[0]) and torch.equal(o[1], want[1]) for o in out)


@needs_kernel
def test_custom_operator_passes_opcheck():
    """The custom operator torch.compile uses: schema, fake tensors and autograd agree with
    its eager kernel (``torch.library.opcheck``)."""
    if not native_spline.traceable():
        pytest.skip("torch.library.custom_op needs torch >= 2.4")
    K = 5
    x, p, low, high = _problem(K, B=9, n=2, dtype=torch.float64)
    for save in (True, False):
        args = (x.requires_grad_(), p.detach().requires_grad_(), low, high, K, *FLOORS, False,
                save)
        op = getattr(torch.ops.normflux, native_spline.OP_NAME.split("::")[1]).default
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("env", [{"NORMFLUX_NATIVE": "0"}, {"CC": "false"}, {"CC": "gcc '-O2"}])
def test_fallback_without_the_kernel(env, tmp_path):
    """Switched off, or with a compiler that fails, the kernel is not loaded and the spline
    runs on tensor ops with the same results (a fresh cache, so nothing is reused)."""
    code = (
        "import torch\n"
        "from normflux.transforms import native_spline\n"
        "from normflux.transforms.fused_spline import _reference, fused_rq_spline\n"
        "g = torch.Generator().manual_seed(0)\n"
        "x = torch.randn(50, 3, generator=g, dtype=torch.float64) * 2\n"
        "p = torch.randn(50, 3, 23, generator=g, dtype=torch.float64)\n"
        "lo, hi = torch.full((3,), -3.0, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64)\n"
        "y, l = fused_rq_spline(x, p, lo, hi, bins=8)\n"
        "yr, lr = _reference(x, p, lo, hi, 8, 1e-3, 1e-3, 1e-3, False)\n"
        "assert (y - yr).abs().max() < 1e-12 and (l - lr).abs().max() < 1e-12\n"
        "print(native_spline.available())\n")
    environ = dict(os.environ, NORMFLUX_CACHE=str(tmp_path / "cache"), **env)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    # a compiler that fails is reported once; switching the kernel off is silent
    if env.get("CC") == "false":
        assert "C kernel is unavailable (false failed to build it" in done.stderr
    elif "CC" in env:  # a CC that is not a command line
        assert "C kernel is unavailable (CC=\"gcc '-O2\" cannot be split" in done.stderr
    else:
        assert "C kernel is unavailable" not in done.stderr
    assert not list(tmp_path.glob("**/*.so"))  # nothing was built


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_build_is_cached_per_source_and_machine(tmp_path):
    """A fresh cache gets one shared library; a second process reuses it."""
    code = "from normflux.transforms import native_spline; print(native_spline.available())"
    environ = dict(os.environ, NORMFLUX_CACHE=str(tmp_path))
    environ.pop("NORMFLUX_NATIVE", None)
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
    built = list(tmp_path.glob("kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    subprocess.run([sys.executable, "-c", code], env=environ, check=True, timeout=300,
                   capture_output=True)
    assert built[0].stat().st_mtime_ns == mtime  # not rebuilt


# ---------------------------------------------------------------- found by a breaker pass
@needs_kernel
def test_box_ends_with_different_strides():
    """A scalar ``low`` beside an ``(n,)`` ``high`` (stride 0 against 1) reads each with
    its own stride."""
    K = 5
    x, p, low, high = _problem(K, B=20, n=4, dtype=torch.float64)
    for lo, hi in ((-2.5, high), (low, 2.5), (low, torch.stack([high, high], 1)[:, 1])):
        y, lad = fused_rq_spline(x, p, lo, hi, bins=K)
        lo_t = torch.as_tensor(lo, dtype=torch.float64).expand(4)
        hi_t = torch.as_tensor(hi, dtype=torch.float64).expand(4)
        yr, lr = _reference(x, p, lo_t, hi_t, K, *FLOORS, False)
        assert (y - yr).abs().max() < 1e-12 and (lad - lr).abs().max() < 1e-12


@needs_kernel
def test_tiny_slopes_without_a_floor():
    """softplus of a very negative parameter (min_derivative = 0) stays accurate: the
    ladj at an interior knot is finite and equals the reference's."""
    K = 2
    p = torch.zeros(4, 1, 3 * K - 1, dtype=torch.float64)
    p[:, 0, 2 * K] = torch.tensor([-30.0, -36.0, -40.0, -60.0])
    x = torch.zeros(4, 1, dtype=torch.float64)  # the interior knot of two equal bins
    lo, hi = torch.tensor([-3.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)
    y, lad = fused_rq_spline(x, p, lo, hi, bins=K, min_derivative=0.0)
    yr, lr = _reference(x, p, lo, hi, K, 1e-3, 1e-3, 0.0, False)
    assert torch.isfinite(lad).all() and (lad - lr).abs().max() < 1e-9
    assert (lad.flatten() - torch.tensor([-30.0, -36.0, -40.0, -60.0], dtype=torch.float64)
            ).abs().max() < 1.0  # log slope ~ the parameter


@pytest.mark.parametrize("inverse", [False, True])
def test_batched_vector_jacobian_products(inverse):
    """``is_grads_batched`` (the backward receives batched gradients without storage) and
    ``jacobian(vectorize=True)`` differentiate the reference."""
    K, B, n = 4, 5, 3
    x, p, low, high = _problem(K, B=B, n=n, dtype=torch.float64)
    x, p = x.requires_grad_(), p.detach().requires_grad_()
    y, _ = fused_rq_spline(x, p, low, high, bins=K, inverse=inverse)
    yr, _ = _reference(x, p, low, high, K, *FLOORS, inverse)
    v = torch.eye(B * n, dtype=torch.float64).view(B * n, B, n)
    (J,) = torch.autograd.grad(y, x, v, is_grads_batched=True)
    (Jr,) = torch.autograd.grad(yr, x, v, is_grads_batched=True)
    assert (J - Jr).abs().max() < 1e-12
    f = lambda q: fused_rq_spline(x.detach(), q, low, high, bins=K, inverse=inverse)[1]  # noqa: E731
    Jp = torch.autograd.functional.jacobian(f, p.detach(), vectorize=True)
    assert Jp.shape == (B, n, B, n, 3 * K - 1) and torch.isfinite(Jp).all()


def test_degenerate_shapes():
    K = 4
    y, lad = fused_rq_spline(torch.zeros(3, 0), torch.zeros(3, 0, 3 * K - 1), torch.zeros(0),
                             torch.zeros(0), bins=K)
    assert y.shape == lad.shape == (3, 0)
    with pytest.raises(ValueError, match="0-d"):
        fused_rq_spline(torch.tensor(0.5), torch.zeros(3 * K - 1), -3.0, 3.0, bins=K)


def test_compile_fullgraph_before_any_eager_call(tmp_path):
    """torch.compile(fullgraph=True) traced as the first use in a process (the kernel not
    yet loaded) takes the availability check as a constant instead of tracing the build."""
    code = (
        "import torch\n"
        "from normflux.transforms.fused_spline import fused_rq_spline\n"
        "x = torch.randn(7, 3); p = torch.randn(7, 3, 23)\n"
        "lo, hi = torch.full((3,), -3.0), torch.full((3,), 3.0)\n"
        "f = torch.compile(lambda x, p: fused_rq_spline(x, p, lo, hi, bins=8), fullgraph=True,\n"
        "                  backend='aot_eager')\n"
        "y, l = f(x, p)\n"
        "y2, l2 = fused_rq_spline(x, p, lo, hi, bins=8)\n"
        "assert torch.allclose(y, y2) and torch.allclose(l, l2)\n")
    environ = dict(os.environ, NORMFLUX_CACHE=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_unwritable_cache_falls_back_to_a_temporary_directory(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code = "from normflux.transforms import native_spline; print(native_spline.available())"
    environ = dict(os.environ, NORMFLUX_CACHE=str(blocker / "cache"))
    environ.pop("NORMFLUX_NATIVE", None)
    done = subprocess.run([sys.executable, "-c", code], env=environ, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr
