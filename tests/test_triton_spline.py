"""The spline's Triton kernels (the GPU path), interpreted on the CPU.

``TRITON_INTERPRET=1`` makes Triton run kernels on CPU tensors with NumPy, so a machine
without a GPU checks the kernels' arithmetic: ``tests/triton_interpreted.py`` runs them in
a subprocess (the variable must be set before Triton is imported) and reports measured
errors, asserted here. ``tests/test_cuda.py`` runs them compiled, on a GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normflux.transforms import triton_spline

pytestmark = pytest.mark.skipif(triton_spline.triton is None, reason="Triton does not import here")

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    script = Path(__file__).with_name("triton_interpreted.py")
    out = subprocess.run([sys.executable, str(script)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _cases(report, **where):
    cases = [c for c in report["cases"] if all(c[k] == v for k, v in where.items())]
    assert cases
    return cases


@pytest.mark.parametrize("inverse", [False, True])
def test_float64_matches_the_reference(report, inverse):
    """Values and gradients against the differentiable reference in float64, every bin
    count and layout (the inverse's gradients to its conditioning: 1/slope amplifies the
    rounding of both)."""
    for c in _cases(report, inverse=inverse):
        assert max(c["f64_vs_exact"]) < (1e-9 if inverse else 1e-12), c


@pytest.mark.parametrize("inverse", [False, True])
def test_same_results_as_the_c_kernel(report, inverse):
    """The same computation as the C kernel: float32 results within 2 ulp of it (rounded
    once from float64 by both: in practice identical), float64 ones to rounding."""
    if not report["native"]:
        pytest.skip("the C kernel did not build here")
    for c in _cases(report, inverse=inverse):
        assert max(c["f32_vs_kernel"]) <= 2 * EPS32, c
        assert max(c["f64_vs_kernel"]) < (1e-9 if inverse else 1e-12), c


def test_parameter_gradients_keep_the_parameters_strides(report):
    """The batch-minor layout's gradient is written in that layout (no copy)."""
    assert all(c["grad_strides_kept"] for c in report["cases"])


def test_nonfinite_inputs_and_degenerate_shapes(report):
    """NaN stays NaN, +-inf pass through (the identity outside the box, ladj 0), other
    rows unaffected; empty batches and leading batch dimensions work."""
    nf = report["nonfinite"]
    assert nf["y_nan"] and nf["y_inf"] == float("inf") and nf["y_minf"] == -float("inf")
    assert nf["lad"] == [0.0, 0.0] and nf["others_finite"]
    assert report["empty_shape"] == [0, 3]
    shape, ey, el = report["leading_dims"]
    assert shape == [3, 4, 3] and ey == 0.0 and el == 0.0


def test_nan_parameters_give_nan_outputs(report):
    """A NaN or infinite parameter (a diverged network) gives NaN where the reference
    does, not a value clamped onto a bin end."""
    for same_nans, y00_nan, ey, el in report["nan_params"]:
        assert same_nans and y00_nan
        assert ey < 1e-9 and el < 1e-9


def test_second_derivatives_come_from_the_reference(report):
    assert report["second_derivative"] < 1e-12


# ------------------------------------------------------------------ a failing Triton
class _TritonError(Exception):
    """Stands for an error raised by Triton itself (compilation, resources, device)."""


_TritonError.__module__ = "triton.compiler.errors"


class _FailingKernel:
    def __init__(self, error):
        self.error = error

    def __getitem__(self, grid):
        def launch(*args, **meta):
            raise self.error
        return launch


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setattr(triton_spline, "_failure", None)
    monkeypatch.delenv("NORMFLUX_TRITON", raising=False)


def _problem(K=8, B=6, n=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, n, generator=g, dtype=torch.float64) * 2
    p = torch.randn(B, n, 3 * K - 1, generator=g, dtype=torch.float64)
    return x, p, -3.0 * torch.ones(n, dtype=torch.float64), 3.0 * torch.ones(n, dtype=torch.float64)


def test_a_triton_failure_warns_once_and_switches_the_kernels_off(fresh_state, monkeypatch):
    monkeypatch.setattr(triton_spline, "_forward_kernel",
                        _FailingKernel(_TritonError("at 3:4:\nunsupported on this GPU")))
    assert triton_spline.available()
    x, p, lo, hi = _problem()
    with pytest.warns(RuntimeWarning, match="unsupported on this GPU"):
        with pytest.raises(triton_spline.KernelUnavailable):
            triton_spline.rq_spline(x, p, lo, hi, 8, 1e-3, 1e-3, 1e-3, False)
    assert not triton_spline.available()


def test_other_errors_propagate_unchanged(fresh_state, monkeypatch):
    monkeypatch.setattr(triton_spline, "_forward_kernel", _FailingKernel(MemoryError("oom")))
    x, p, lo, hi = _problem()
    with pytest.raises(MemoryError, match="oom"):
        triton_spline.rq_spline(x, p, lo, hi, 8, 1e-3, 1e-3, 1e-3, False)
    assert triton_spline.available()


@pytest.mark.parametrize("inverse", [False, True])
def test_a_failing_backward_kernel_differentiates_the_reference(fresh_state, monkeypatch,
                                                                inverse):
    """The forward ran (here: stood in for by the reference's values), the backward kernel
    fails: the gradients come from the reference, exactly."""
    from normflux.transforms.fused_spline import _reference
    floors = (1e-3, 1e-3, 1e-3)

    def forward(x2, u3, low, high, K, mw, mh, md, inverse):
        with torch.no_grad():
            return _reference(x2, u3, low, high, K, mw, mh, md, inverse)
    monkeypatch.setattr(triton_spline, "_forward", forward)
    monkeypatch.setattr(triton_spline, "_backward_kernel", _FailingKernel(_TritonError("x")))
    x, p, lo, hi = _problem()
    xa, pa = x.clone().requires_grad_(), p.clone().requires_grad_()
    with pytest.warns(RuntimeWarning):
        y, lad = triton_spline.rq_spline(xa, pa, lo, hi, 8, *floors, inverse)
        ga = torch.autograd.grad((y * y).sum() + lad.sum(), (xa, pa))
    xb, pb = x.clone().requires_grad_(), p.clone().requires_grad_()
    y, lad = _reference(xb, pb, lo, hi, 8, *floors, inverse)
    gb = torch.autograd.grad((y * y).sum() + lad.sum(), (xb, pb))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert not triton_spline.available()


def test_switched_off_by_the_environment(fresh_state, monkeypatch):
    monkeypatch.setenv("NORMFLUX_TRITON", "0")
    assert not triton_spline.available()


# ------------------------------------------------------------------ compiled for a GPU
@pytest.mark.parametrize("kernel,inverse,specialised", [
    ("_forward_kernel", False, False), ("_forward_kernel", True, True),
    ("_backward_kernel", False, True), ("_backward_kernel", True, False)])
def test_kernels_compile_for_hopper_without_a_gpu(kernel, inverse, specialised):
    """Triton compiles the kernels to a cubin for sm_90 (H100/H200) on a machine without a
    GPU: what the interpreter cannot see (types, specialisation of unit strides into
    constants) is checked here. No index product is computed in 32 bits, where the
    parameter axis' offsets (3K - 1) * stride can pass 2**31 on large tensors."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton has no ahead-of-time compile API")
    fn = getattr(triton_spline, kernel)
    const = {"K": 8, "INVERSE": inverse, "BLOCK": triton_spline.BLOCK}
    sig = {}
    for a in fn.arg_names:
        if a in const:
            sig[a] = "constexpr"
        elif a.endswith("_ptr"):
            sig[a] = "*fp64" if a in ("c_ptr", "gu_ptr") else "*fp32"
        elif specialised and a in ("sup", "sgup", "sxc", "slc"):  # unit strides
            sig[a], const[a] = "constexpr", 1
        else:
            sig[a] = "i32"
    compiled = triton_spline.triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const),
                                            target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"]
    narrow = [ln for ln in compiled.asm["ttir"].splitlines() if "arith.muli" in ln and ": i32" in ln]
    assert not narrow, narrow[:3]
