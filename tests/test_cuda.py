"""CUDA: every registered layer, every architecture and the fused spline on a GPU agree
with the CPU, and the GPU paths keep the contract.

Skipped where torch sees no CUDA device (CI has none). On a GPU machine::

    python -m pytest -q tests/test_cuda.py          # add --runslow for the inductor compile

On a GPU the spline runs as Triton kernels (or, without Triton, as the fused tensor-op
Function; the C kernel is CPU-only): the spline tests run both paths against the C kernel
and the reference on real hardware. ``benchmarks/gpu.sh`` runs this file and the GPU
benchmarks in one go.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import LAYER_BY_NAME, LAYERS, build, inputs

from normflux import models
from normflux.testing import check_transform
from normflux.training import evaluate_nll, fit_to_data
from normflux.transforms import triton_spline
from normflux.transforms.fused_spline import fused_rq_spline
from normflux.transforms.splines import rational_quadratic_spline, spline_knots

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

CUDA = torch.device("cuda")
F64 = torch.float64
ARCHS = ["nsf", "realnvp", "maf", "iaf", "nsf-ar", "planar", "radial", "sylvester"]


def _on(t, device):
    return None if t is None else t.to(device)


def _leaf(t, device, dtype=None):
    return t.to(device, dtype).detach().requires_grad_()


@pytest.mark.parametrize("name", [s.name for s in LAYERS])
def test_every_layer_passes_the_harness_on_cuda_and_matches_the_cpu(name):
    spec = LAYER_BY_NAME[name]
    t_cpu = build(name, jitter=0.3, dtype=F64)
    x, ctx = inputs(spec, n=8, dtype=F64)
    t = copy.deepcopy(t_cpu).to(CUDA)
    report = check_transform(t, x.to(CUDA), _on(ctx, CUDA))
    assert report.ok, str(report)
    # data-dependent initialisation (ActNorm) has now run on the GPU copy: give the CPU
    # copy the same state before comparing
    t_cpu.load_state_dict({k: v.cpu() for k, v in t.state_dict().items()})
    t.eval()
    t_cpu.eval()
    with torch.no_grad():
        z, ladj = t(x.to(CUDA), _on(ctx, CUDA))
        z_ref, ladj_ref = t_cpu(x, ctx)
        assert z.device.type == "cuda" and ladj.device.type == "cuda"
        torch.testing.assert_close(z.cpu(), z_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ladj.cpu(), ladj_ref, rtol=1e-10, atol=1e-10)
        xr, ladj_inv = t.inverse(z, _on(ctx, CUDA))
        torch.testing.assert_close(xr.cpu(), t_cpu.inverse(z_ref, ctx)[0], rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("context", [None, 3])
@pytest.mark.parametrize("name", ARCHS)
def test_every_architecture_trains_and_samples_on_cuda(name, context):
    if context is not None and name in ("planar", "radial", "sylvester"):
        context = None  # covered unconditionally; the conditional case is the couplings'
    flow_cpu = models.build(name, 4, context=context, layers=3, hidden=(16, 16), seed=0).double()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow_cpu.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    flow = copy.deepcopy(flow_cpu).to(CUDA)
    x = torch.randn(64, 4, generator=g, dtype=F64)
    c = None if context is None else torch.randn(64, context, generator=g, dtype=F64)

    lp = flow.log_prob(x.to(CUDA), _on(c, CUDA))
    lp_ref = flow_cpu.log_prob(x, c)
    assert lp.device.type == "cuda"
    torch.testing.assert_close(lp.cpu(), lp_ref, rtol=1e-9, atol=1e-9)

    (-lp.mean()).backward()
    (-lp_ref.mean()).backward()
    for (n, p), p_ref in zip(flow.named_parameters(), flow_cpu.parameters()):
        assert (p.grad is None) == (p_ref.grad is None), n
        if p.grad is not None:
            torch.testing.assert_close(p.grad.cpu(), p_ref.grad, rtol=1e-7, atol=1e-9, msg=n)

    with torch.no_grad():
        s, lq = flow.sample_and_log_prob(32, None if c is None else c[0].to(CUDA))
    assert s.device.type == "cuda" and s.shape == (32, 4)
    torch.testing.assert_close(flow.log_prob(s, None if c is None else c[0].to(CUDA)), lq,
                               rtol=1e-7, atol=1e-7)


@pytest.fixture(params=["triton", "ops"])
def backend(request, monkeypatch):
    """The GPU's two spline paths: the Triton kernels, and the tensor-op Function (where
    Triton is missing or ``NORMFLUX_TRITON=0``)."""
    if request.param == "ops":
        monkeypatch.setattr(triton_spline, "available", lambda: False)
    elif not triton_spline.available():
        pytest.skip("Triton does not import here")
    return request.param


def _spline_problem(dtype, seed=3, K=8, n=5, B=512):
    """Inputs (about a third in the tails) and parameters rounded to ``dtype`` once, so that
    every path below sees the same values."""
    g = torch.Generator().manual_seed(seed)
    params = (2 * torch.randn(B, n, 3 * K - 1, generator=g, dtype=F64)).to(dtype)
    x = (4 * torch.randn(B, n, generator=g, dtype=F64)).to(dtype)
    gy, gl = (torch.randn(B, n, generator=g, dtype=F64).to(dtype) for _ in range(2))
    return x, params, gy, gl, K


def _spline_case(inverse, dtype, device, seed=3, fn=None):
    """Values and gradients (float64, on the CPU) of ``fn`` (``fused_rq_spline`` by default)
    on the problem, evaluated in ``dtype`` on ``device``."""
    x, params, gy, gl, K = _spline_problem(dtype, seed)
    xd, pd = _leaf(x, device, dtype), _leaf(params, device, dtype)
    low = torch.full((x.shape[1],), -3.0, dtype=dtype, device=device)
    fn = fn or (lambda x, p, lo, hi: fused_rq_spline(x, p, lo, hi, bins=K, inverse=inverse))
    y, ladj = fn(xd, pd, low, -low)
    gx, gp = torch.autograd.grad((y, ladj), (xd, pd), (gy.to(device, dtype), gl.to(device, dtype)))
    return [t.detach().cpu().to(F64) for t in (y, ladj, gx, gp)]


def _exact(inverse, dtype, device="cpu"):
    """The differentiable reference in float64 on the problem rounded to ``dtype``."""
    return _spline_case(inverse, dtype, device, fn=lambda x, p, lo, hi: rational_quadratic_spline(
        x.double(), *spline_knots(p.double(), lo.double(), hi.double(), bins=8),
        inverse=inverse))


def _rel_err(a, b):
    return ((a - b).abs() / (1 + b.abs())).max().item()


NAMES4 = ("y", "ladj", "x.grad", "params.grad")


@pytest.mark.parametrize("inverse", [False, True])
def test_fused_spline_on_cuda_matches_the_cpu_in_float64(inverse, backend):
    """GPU against CPU (the C kernel where it builds): values and gradients to rounding, in
    float64 (the inverse's gradients to its conditioning: 1/slope amplifies rounding)."""
    gpu = _spline_case(inverse, F64, CUDA)
    cpu = _spline_case(inverse, F64, "cpu")
    for name, a, b in zip(NAMES4, gpu, cpu):
        assert _rel_err(a, b) < (1e-9 if inverse else 1e-11), name


@pytest.mark.parametrize("inverse", [False, True])
def test_fused_spline_on_cuda_matches_the_reference(inverse, backend):
    """The fused path against the differentiable reference, both on the GPU, float64."""
    gpu = _spline_case(inverse, F64, CUDA)
    ref = _exact(inverse, F64, CUDA)
    for name, a, b in zip(NAMES4, gpu, ref):
        assert _rel_err(a, b) < (1e-9 if inverse else 1e-11), name


@pytest.mark.parametrize("inverse", [False, True])
def test_triton_kernels_round_float32_correctly(inverse):
    """Like the C kernel, the Triton kernels compute in float64 and round once: float32
    values and gradients within 2 ulp of the float64 reference on the same inputs."""
    if not triton_spline.available():
        pytest.skip("Triton does not import here")
    gpu = _spline_case(inverse, torch.float32, CUDA)
    exact = _exact(inverse, torch.float32)
    eps = torch.finfo(torch.float32).eps
    for name, a, b in zip(NAMES4, gpu, exact):
        assert _rel_err(a, b) < 2 * eps, f"{name}: {_rel_err(a, b) / eps:.1f} ulp"


@pytest.mark.parametrize("inverse", [False, True])
def test_tensor_op_path_on_cuda_in_float32_is_as_accurate_as_on_the_cpu(inverse, monkeypatch):
    """Without Triton the GPU runs the tensor-op Function, whose float32 error
    (cancellation in the bin arithmetic, ``benchmarks/accuracy.py``) is larger than the
    kernels'; the GPU's own exp/log/division and FMA contraction must not add to it."""
    from normflux.transforms import native_spline
    monkeypatch.setattr(triton_spline, "available", lambda: False)
    monkeypatch.setattr(native_spline, "available", lambda: False)
    exact = _exact(inverse, torch.float32)
    gpu = _spline_case(inverse, torch.float32, CUDA)
    cpu_ops = _spline_case(inverse, torch.float32, "cpu")
    eps = torch.finfo(torch.float32).eps
    for name, a, b, ref in zip(NAMES4, gpu, cpu_ops, exact):
        assert _rel_err(a, ref) <= 4 * _rel_err(b, ref) + 8 * eps, name


def test_triton_kernels_are_one_launch_per_pass():
    """The point of the kernels: a spline layer's forward and backward launch one kernel
    each on the GPU, where the tensor-op Function launches about a hundred."""
    if not triton_spline.available():
        pytest.skip("Triton does not import here")
    from torch.profiler import ProfilerActivity, profile
    x, params, gy, gl, K = _spline_problem(torch.float32)
    xd, pd = _leaf(x, CUDA), _leaf(params, CUDA)
    low = torch.full((x.shape[1],), -3.0, device=CUDA)
    fused_rq_spline(xd, pd, low, -low, bins=K)  # compile the kernels first
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        y, ladj = fused_rq_spline(xd, pd, low, -low, bins=K)
        torch.autograd.grad((y, ladj), (xd, pd), (gy.to(CUDA), gl.to(CUDA)))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    spline = [n for n in names if "_forward_kernel" in n or "_backward_kernel" in n]
    assert len(spline) == 2, names


def test_a_flow_moved_to_the_gpu_trains_there():
    """A model built on the CPU and moved: Adam steps on the GPU lower its NLL."""
    flow = models.build("nsf", 2, layers=2, hidden=(16, 16), seed=0).to(CUDA)
    opt = torch.optim.Adam(flow.parameters(), lr=1e-3)
    x = torch.randn(256, 2, device=CUDA)
    before = flow.log_prob(x).mean().item()
    for _ in range(20):
        opt.zero_grad()
        loss = -flow.log_prob(x).mean()
        loss.backward()
        opt.step()
    assert flow.log_prob(x).mean().item() > before


def test_fit_to_data_trains_a_gpu_flow_on_cpu_data():
    """``fit_to_data`` moves CPU data to the flow's device batch by batch and seeds the
    GPU's generator too: the NLL falls, the flow stays on the GPU."""
    flow = models.build("nsf", 2, layers=2, hidden=(16, 16), seed=0).to(CUDA)
    data = torch.randn(512, 2) * torch.tensor([2.0, 0.5]) + 1.0
    nll0 = evaluate_nll(flow, data)
    history = fit_to_data(flow, data, epochs=20, batch_size=128, lr=3e-3, val_fraction=0.0,
                          progress=False)
    assert len(history["train_loss"]) == 20
    assert evaluate_nll(flow, data) < nll0 - 0.2
    assert all(p.device.type == "cuda" for p in flow.parameters())


@pytest.mark.slow
def test_inductor_compiles_log_prob_and_sample_on_cuda():
    torch._dynamo.reset()
    flow = models.build("nsf", 4, layers=2, hidden=(16, 16), seed=0).to(CUDA).eval()
    lp = torch.compile(flow.log_prob, fullgraph=True)
    smp = torch.compile(flow.sample_and_log_prob, fullgraph=True)
    x = torch.randn(128, 4, device=CUDA)
    torch.testing.assert_close(lp(x), flow.log_prob(x), rtol=1e-4, atol=1e-4)
    with torch._dynamo.config.patch(error_on_recompile=True):
        x = 3 * torch.randn(128, 4, device=CUDA)
        torch.testing.assert_close(lp(x), flow.log_prob(x), rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        s, lq = smp(64)
    torch.testing.assert_close(flow.log_prob(s), lq, rtol=1e-3, atol=1e-3)
