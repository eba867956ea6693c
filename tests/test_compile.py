"""torch.compile(fullgraph=True) of Flow.log_prob and Flow.sample for every vector flow.

Issue 4: no graph break (``fullgraph=True`` raises on one) and no recompilation across
batches of different content (``error_on_recompile``). Every architecture is traced with
the ``aot_eager`` backend (dynamo + AOT autograd, the part that can break); one small flow
goes through inductor end to end.
"""

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
