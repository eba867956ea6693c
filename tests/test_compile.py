"""torch.compile(fullgraph=True) of Flow.log_prob and Flow.sample for every vector flow.

Issue 4: no graph break (``fullgraph=True`` raises on one) and no recompilation across
batches of different content (``error_on_recompile``). Every architecture is traced with
the ``aot_eager`` backend (dynamo + AOT autograd, the part that can break); one small flow
goes through inductor end to end.
"""

import subprocess
import sys

import pytest
import torch
import torch._dynamo

from normflux import models

NAMES = ["nsf", "realnvp", "maf", "iaf", "nsf-ar", "planar", "radial", "sylvester"]


def _flow(name, context=None):
    flow = models.build(name, 3, context=context, layers=2, hidden=(8, 8), seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return flow.eval()


def _check(flow, backend, context=None):
    torch._dynamo.reset()
    lp = torch.compile(flow.log_prob, fullgraph=True, backend=backend)
    smp = torch.compile(flow.sample_and_log_prob, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=False):
        x = torch.randn(16, 3)
        c = torch.randn(16, context) if context else None
        ref = flow.log_prob(x, c)
        out = lp(x, c)
        assert (out - ref).abs().max() < 1e-4
        torch.manual_seed(1)
        s, lq = smp(16, None if c is None else c[0])
        assert s.shape == (16, 3) and torch.isfinite(lq).all()
        assert (flow.log_prob(s, None if c is None else c[0]) - lq).abs().max() < 1e-3
    # new content, same shapes: no recompilation
    with torch._dynamo.config.patch(error_on_recompile=True):
        for _ in range(2):
            x = 3 * torch.randn(16, 3)
            c = torch.randn(16, context) if context else None
            assert (lp(x, c) - flow.log_prob(x, c)).abs().max() < 1e-4
            smp(16, None if c is None else c[0])


@pytest.mark.parametrize("name", NAMES)
def test_fullgraph_no_recompile_every_architecture(name):
    _check(_flow(name), "aot_eager")


@pytest.mark.parametrize("name", ["nsf", "maf"])
def test_fullgraph_conditional(name):
    _check(_flow(name, context=2), "aot_eager", context=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nsf", "nsf-ar"])
def test_inductor_end_to_end(name):
    _check(_flow(name), "inductor")


def test_kernel_availability_carries_torchs_constant_mark():
    # native.available() is traced as a constant; normflux sets dynamo's mark itself
    # rather than import torch._dynamo at import time (1.5 s): the mark must be the one
    # torch's own decorator sets
    from normflux._tracing import constant_when_traced
    from normflux.transforms import native, native_spline

    def ours():
        return True

    def theirs():
        return True

    constant_when_traced(ours)
    torch.compiler.assume_constant_result(theirs)
    assert vars(ours) == vars(theirs) == {"_dynamo_marked_constant": True}
    for fn in (native.available, native_spline.available):
        assert vars(fn).items() >= vars(theirs).items()


def test_import_leaves_dynamo_and_triton_unloaded():
    # importing either took most of `import normflux` (and of every CLI call): 1.5 s for
    # torch._dynamo, 0.2 s for Triton
    code = ("import sys, normflux, normflux.cli; "
            "print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
