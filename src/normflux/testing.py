"""The shared transform test harness, public so that users can check their own layers.

``check_transform(transform, example_input, context=None)`` runs every contract check of
``docs/design.md`` on one transform and raises :class:`TransformCheckError` with a
readable report of what failed (and by how much). Modelled on PyTorch's
``test/distributions/test_transforms.py``: round trip, ``ladj`` against the autograd
Jacobian, shapes, batch of one, context handling, gradients, ``state_dict``, ``.double()``
and ``torch.compile``.
"""

from __future__ import annotations

import copy
import io
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .transforms.base import Transform

__all__ = ["check_transform", "TransformCheckError", "CheckReport"]


class TransformCheckError(AssertionError):
    """Raised by :func:`check_transform`; ``.report`` holds every check's outcome."""

    def __init__(self, report: "CheckReport"):
        self.report = report
        super().__init__(str(report))


@dataclass
class CheckReport:
    """Outcome of each check: name -> (passed, detail)."""

    name: str
    results: dict[str, tuple[bool, str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """``True`` when every recorded check passed (also when none was recorded)."""
        return all(p for p, _ in self.results.values())

    def add(self, check: str, passed: bool, detail: str = "") -> None:
        """Record (or overwrite) the outcome of ``check`` with a human-readable ``detail``."""
        self.results[check] = (bool(passed), detail)

    def __str__(self) -> str:
        lines = [f"check_transform({self.name}): "
                 f"{sum(p for p, _ in self.results.values())}/{len(self.results)} checks passed"]
        for k, (p, d) in self.results.items():
            lines.append(f"  [{'ok' if p else 'FAIL'}] {k}{': ' + d if d else ''}")
        return "\n".join(lines)


def _ctx(context: Tensor | None, i: slice | None = None):
    if context is None:
        return None
    return context if i is None else context[i]


def _jacobian_ladj(t: Transform, x: Tensor, context: Tensor | None, inverse: bool) -> Tensor:
    """``log|det J|`` per sample from the autograd Jacobian, ``(batch,)``."""
    f = t.inverse if inverse else t.forward
    out = []
    for i in range(x.shape[0]):
        xi = x[i:i + 1]
        ci = _ctx(context, slice(i, i + 1)) if context is not None and context.shape[0] > 1 else context

        def g(v, ci=ci, shape=xi.shape):
            return f(v.reshape(shape), ci)[0].reshape(-1)

        J = torch.autograd.functional.jacobian(g, xi.reshape(-1))
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


def _run(report: CheckReport, name: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - the report names the failure
        report.add(name, False, f"{type(e).__name__}: {e}")


def _perturbed(transform: Transform, std: float, seed: int) -> Transform:
    """A deep copy of ``transform`` with ``N(0, std^2)`` added to every floating-point
    parameter (drawn on the CPU from ``seed``, so the same on every device)."""
    t = copy.deepcopy(transform)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in t.parameters():
            if p.is_floating_point():
                p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device))
    return t


def check_transform(transform: Transform, example_input: Tensor, context: Tensor | None = None,
                    *, atol: float | None = None, jacobian: bool = True, compile: bool = False,
                    raise_on_failure: bool = True, perturb: float = 0.1,
                    seed: int = 0) -> CheckReport:
    """Check a transform against the normflux contract.

    Checks (each reported separately):

    * ``shapes``: forward/inverse keep the input shape; ``ladj`` is ``(batch,)`` with the
      input's dtype and device;
    * ``round_trip``: ``inverse(forward(x)) == x`` and ``forward(inverse(z)) == z``
      (tolerance ``atol * (1 + max|x|)``; ``atol`` 1e-5 float32, 1e-10 float64 by
      default; iterative inverses use the transform's documented tolerance via
      ``atol``);
    * ``ladj_cancel``: ``ladj_fwd(x) + ladj_inv(forward(x)) == 0`` (to ``100 atol``);
    * ``volume_preserving`` (transforms that declare it): both ``ladj`` exactly zero;
    * ``ladj_jacobian``: both ``ladj`` against ``slogdet`` of the autograd Jacobian, in
      float64 on a deep copy, to 1e-6 (``jacobian=False`` skips it for large inputs);
    * ``batch_of_one``: the first row alone gives the first row of the batch result;
    * ``context``: a conditional transform rejects ``context=None``, an unconditional
      one rejects a context (``ValueError``/``TypeError``);
    * ``gradients``: the gradient of ``sum(z) + sum(ladj)`` reaches every parameter and
      is finite;
    * ``state_dict``: a deep copy with parameters perturbed, then loaded from the state
      dict (through ``torch.save`` bytes), reproduces the output;
    * ``double``: ``.double()`` outputs and ``ladj`` are float64;
    * ``compile`` (when ``compile=True``): ``torch.compile(fullgraph=True)`` of forward
      and inverse match eager.

    The checks run on a deep copy of the transform whose floating-point parameters are
    moved by ``N(0, perturb^2)`` noise (seeded by ``seed``): a freshly built layer is
    often the identity (a zero last conditioner layer), where a wrong ``ladj`` or inverse
    cannot show. The copy runs in eval mode, except for ``gradients``, which uses one
    in the transform's own mode.

    Arguments:
        transform: the transform under test (not modified: checks run on copies where
            they change it).
        example_input: ``(batch, *event_shape)`` points in the support, batch >= 2.
        context: the context for conditional transforms, ``(batch, C)``.
        atol: round-trip tolerance override.
        jacobian: run the autograd-Jacobian check.
        compile: run the ``torch.compile`` check (slow: seconds per transform).
        raise_on_failure: raise :class:`TransformCheckError` if any check fails.
        perturb: standard deviation of the parameter noise (``0``: check the parameters
            as they are).
        seed: seed of the parameter noise.

    Returns:
        the :class:`CheckReport`.

    Raises:
        TransformCheckError: a check failed and ``raise_on_failure``.
        ValueError: ``example_input`` has batch < 2, a dtype other than the
            transform's, or ``perturb < 0``.
        Exception: whatever the first, unguarded ``forward``/``inverse`` call on
            ``example_input`` raises (the individual checks catch their own errors and
            report them as failures).
    """
    if example_input.shape[0] < 2:
        raise ValueError("example_input needs a batch of at least 2 rows")
    dtypes = {p.dtype for p in transform.parameters()} | {
        b.dtype for b in transform.buffers() if b.is_floating_point()}
    if dtypes and example_input.dtype not in dtypes:
        raise ValueError(f"check_transform: the transform is {sorted(map(str, dtypes))} but "
                         f"example_input is {example_input.dtype}; convert one of them "
                         "(e.g. transform.double() with a float64 input)")
    if not perturb >= 0:
        raise ValueError(f"perturb must be >= 0, got {perturb}")
    t = _perturbed(transform, perturb, seed) if perturb else transform
    x = example_input
    report = CheckReport(type(t).__name__)
    tol = atol if atol is not None else (1e-10 if x.dtype == torch.float64 else 1e-5)
    training = t.training
    t.eval()
    try:
        with torch.no_grad():
            z, ladj = t(x, context)
            xr, ladj_inv = t.inverse(z, context)

        def shapes():
            ok = (z.shape == x.shape and ladj.shape == (x.shape[0],) and ladj.dtype == x.dtype
                  and ladj.device == x.device and xr.shape == x.shape
                  and ladj_inv.shape == (x.shape[0],))
            report.add("shapes", ok, f"z {tuple(z.shape)}, ladj {tuple(ladj.shape)} {ladj.dtype}")
        _run(report, "shapes", shapes)

        def round_trip():
            with torch.no_grad():
                zz, _ = t(xr, context)
            e1 = (xr - x).abs().max().item()
            e2 = (zz - z).abs().max().item()
            scale = 1 + x.abs().max().item()
            report.add("round_trip", max(e1, e2) <= tol * scale and math.isfinite(e1 + e2),
                       f"|inverse(forward(x)) - x| = {e1:.2e}, |forward(inverse(z)) - z| = "
                       f"{e2:.2e} (tol {tol * scale:.1e})")
        _run(report, "round_trip", round_trip)

        def cancel():
            e = (ladj + ladj_inv).abs().max().item()
            report.add("ladj_cancel", e <= 100 * tol and math.isfinite(e),
                       f"|ladj_fwd + ladj_inv| = {e:.2e}")
        _run(report, "ladj_cancel", cancel)

        if t.volume_preserving:  # a Chain does not add this ladj: it must be zero
            def zero_ladj():
                report.add("volume_preserving", not ladj.any() and not ladj_inv.any(),
                           f"max |ladj| = {max(ladj.abs().max(), ladj_inv.abs().max()):.2e}")
            _run(report, "volume_preserving", zero_ladj)

        if jacobian:
            def jac():
                t64 = copy.deepcopy(t).double()
                x64 = x.double()
                c64 = context.double() if context is not None else None
                lf = _jacobian_ladj(t64, x64, c64, inverse=False)
                with torch.no_grad():
                    z64, l64 = t64(x64, c64)
                    _, li64 = t64.inverse(z64, c64)
                li = _jacobian_ladj(t64, z64, c64, inverse=True)
                e1 = (lf - l64).abs().max().item()
                e2 = (li - li64).abs().max().item()
                report.add("ladj_jacobian", max(e1, e2) <= 1e-6,
                           f"|ladj - slogdet(J)| forward {e1:.2e}, inverse {e2:.2e} (float64)")
            _run(report, "ladj_jacobian", jac)

        def batch_one():
            c1 = _ctx(context, slice(0, 1))
            with torch.no_grad():
                z1, l1 = t(x[:1], c1)
                x1, _ = t.inverse(z[:1], c1)
            e = max((z1 - z[:1]).abs().max().item(), (l1 - ladj[:1]).abs().max().item(),
                    (x1 - xr[:1]).abs().max().item())
            report.add("batch_of_one", z1.shape == z[:1].shape and e <= 100 * tol,
                       f"max difference to the batched result {e:.2e}")
        _run(report, "batch_of_one", batch_one)

        def ctx_check():
            raised = False
            try:
                if context is None:
                    t(x, torch.zeros(x.shape[0], 3, dtype=x.dtype, device=x.device))
                else:
                    t(x, None)
            except (ValueError, TypeError) as e:
                raised = "context" in str(e)
            report.add("context", raised,
                       "a missing context is rejected" if context is not None
                       else "an unexpected context is rejected" if raised
                       else "no ValueError/TypeError mentioning 'context' was raised")
        _run(report, "context", ctx_check)

        def grads():
            t2 = copy.deepcopy(t).train(training)
            xg = x.clone().requires_grad_(True)
            zz, ll = t2(xg, context)
            (zz.sum() + ll.sum()).backward()
            bad = [n for n, p in t2.named_parameters() if p.requires_grad and
                   (p.grad is None or not torch.isfinite(p.grad).all())]
            fin = xg.grad is not None and bool(torch.isfinite(xg.grad).all())
            report.add("gradients", not bad and fin,
                       "finite gradients reach every parameter and the input" if not bad and fin
                       else f"missing or non-finite gradients: {bad[:5]}, input finite={fin}")
        _run(report, "gradients", grads)

        def state():
            t2 = copy.deepcopy(t)
            with torch.no_grad():
                for p in t2.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            buf = io.BytesIO()
            torch.save(t.state_dict(), buf)
            buf.seek(0)
            t2.load_state_dict(torch.load(buf, weights_only=True))
            with torch.no_grad():
                z2, l2 = t2(x, context)
            e = max((z2 - z).abs().max().item(), (l2 - ladj).abs().max().item())
            report.add("state_dict", e == 0.0, f"max difference after load {e:.2e}")
        _run(report, "state_dict", state)

        def double():
            t64 = copy.deepcopy(t).double()
            c64 = context.double() if context is not None else None
            with torch.no_grad():
                z64, l64 = t64(x.double(), c64)
                x64, li64 = t64.inverse(z64, c64)
            ok = all(v.dtype == torch.float64 for v in (z64, l64, x64, li64))
            report.add("double", ok, f"dtypes {z64.dtype}, {l64.dtype}, {x64.dtype}, {li64.dtype}")
        _run(report, "double", double)

        if compile:
            def comp():
                torch._dynamo.reset()
                fwd = torch.compile(t.forward, fullgraph=True)
                inv = torch.compile(t.inverse, fullgraph=True)
                with torch.no_grad():
                    zc, lc = fwd(x, context)
                    xc, lic = inv(z, context)
                e = max((zc - z).abs().max().item(), (lc - ladj).abs().max().item(),
                        (xc - xr).abs().max().item(), (lic - ladj_inv).abs().max().item())
                report.add("compile", e <= max(tol, 1e-5) * (1 + x.abs().max().item()),
                           f"compiled vs eager {e:.2e}")
            _run(report, "compile", comp)
    finally:
        t.train(training)
    if raise_on_failure and not report.ok:
        raise TransformCheckError(report)
    return report
