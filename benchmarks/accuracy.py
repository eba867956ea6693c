"""Float32 round-trip accuracy of the spline paths near knots and tails (issue 4: speed
must not cost accuracy).

Run::

    .venv/bin/python benchmarks/accuracy.py

For RQ splines with K = 8 bins, tail bound 3 and unconstrained parameters of scale 1, 5
and 20 (sharper splines: narrow bins, extreme slopes), float32 inputs are placed

* ``knots``: on every x-knot and 1, 2, 4, ..., 64 ulps either side of it;
* ``tails``: on the box ends ``+-3`` and 1..64 ulps either side, and far out (``+-1e4``);
* ``sweep``: 20001 points evenly over ``[-3.5, 3.5]``;

then mapped forward and back through the three implementations of
:func:`normflux.transforms.fused_spline.fused_rq_spline`: (a) ``kernel``, the C kernel (the
eager CPU path where it builds; computed in float64, rounded once), (b) ``fused-ops``, the
tensor-op Function (without a C compiler, on other devices), and (c) ``reference``
(``spline_knots`` + ``rational_quadratic_spline``, the path ``torch.func`` uses). Reported
per path, over 20 parameter draws per scale:

* ``forward``: max ``|f(x) - y| / (eps (1 + |y|))`` with ``f`` in float64: the forward
  error in units of float32 eps (correct rounding gives at most 0.5);

* ``backward``: max ``|f(f^-1(y)) - y| / (eps (1 + |y|) (1 + f'))`` with ``y = f(x)``,
  ``f`` and ``f'`` evaluated in float64 at the float32 inverse: the inverse's backward
  error in units of float32 eps (a backward-stable inverse keeps this O(1));
* ``roundtrip``: max ``|f^-1(f(x)) - x| / (eps ((1 + |x|) + (1 + |y|) / f'(x)))``: the
  forward error relative to what rounding ``y`` alone causes (where the spline is flat,
  ``f' ~ 1e-3``, many x share one float32 y and no inverse can recover x);
* ``ladj``: max ``|ladj_f(x) + ladj_inv(f(x))|`` (0 for an exact inverse; grows where the
  round trip cannot be exact and the log-slope varies fast);
* ``nonfinite``: outputs that are NaN or infinite (must be 0).

One JSON line per (scale, region, path), then a markdown table.
"""

from __future__ import annotations

import json
import sys

import torch

from normflux.transforms import native_spline
from normflux.transforms.fused_spline import _reference, fused_rq_spline
from normflux.transforms.splines import spline_knots

K, BOUND, DRAWS = 8, 3.0, 20
FLOORS = (1e-3, 1e-3, 1e-3)


def _near(points: torch.Tensor, ulps=(0, 1, 2, 4, 8, 16, 32, 64)) -> torch.Tensor:
    """``points`` and float32 neighbours ``ulps`` steps above and below each."""
    out = [points]
    for direction in (float("inf"), -float("inf")):
        cur = points.clone()
        steps = 0
        for u in ulps[1:]:
            while steps < u:
                cur = torch.nextafter(cur, torch.full_like(cur, direction))
                steps += 1
            out.append(cur.clone())
        steps = 0
    return torch.cat(out)


def _without_kernel(f):
    def g(*args):
        available = native_spline.available
        native_spline.available = lambda: False
        try:
            return f(*args)
        finally:
            native_spline.available = available
    return g


def _paths(x, p, low, high):
    fused = lambda v, inverse: fused_rq_spline(v, p, low, high, bins=K, inverse=inverse)  # noqa: E731
    paths = {"kernel": fused} if native_spline.available() else {}
    paths["fused-ops"] = _without_kernel(fused)
    paths["reference"] = lambda v, inverse: _reference(v, p, low, high, K, *FLOORS, inverse)
    return paths


def measure() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    low, high = torch.tensor([-BOUND]), torch.tensor([BOUND])
    eps = torch.finfo(torch.float32).eps
    records = []
    for scale in (1.0, 5.0, 20.0):
        worst: dict = {}
        for _ in range(DRAWS):
            p1 = scale * torch.randn(1, 1, 3 * K - 1, generator=g)
            xk = spline_knots(p1, low, high, bins=K)[0].flatten()
            regions = {
                "knots": _near(xk[1:K]),
                "tails": torch.cat([_near(torch.tensor([-BOUND, BOUND])),
                                    torch.tensor([-1e4, 1e4])]),
                "sweep": torch.linspace(-3.5, 3.5, 20001),
            }
            for region, pts in regions.items():
                x = pts[:, None]
                p = p1.expand(x.shape[0], 1, 3 * K - 1)
                for path, f in _paths(x, p, low, high).items():
                    with torch.no_grad():
                        y, lf = f(x, False)
                        xr, li = f(y, True)
                    finite = torch.isfinite(y) & torch.isfinite(xr) & torch.isfinite(lf) \
                        & torch.isfinite(li)
                    p64 = p.double()
                    y64, l64 = _reference(xr.double(), p64, low.double(), high.double(), K,
                                          *FLOORS, False)
                    fx64, lx64 = _reference(x.double(), p64, low.double(), high.double(), K,
                                            *FLOORS, False)
                    fe = ((fx64 - y.double()).abs() / (eps * (1 + fx64.abs())))[finite]
                    be = ((y64 - y.double()).abs() / (eps * (1 + y.double().abs())
                                                       * (1 + l64.exp())))[finite]
                    rt = ((xr - x).double().abs() / (eps * ((1 + x.double().abs())
                          + (1 + y.double().abs()) / lx64.exp())))[finite]
                    la = (lf + li).abs()[finite]
                    key = (region, path)
                    w = worst.setdefault(key, {"forward": 0.0, "backward": 0.0, "roundtrip": 0.0,
                                               "ladj": 0.0, "nonfinite": 0})
                    w["forward"] = max(w["forward"], float(fe.max()) if fe.numel() else 0.0)
                    w["backward"] = max(w["backward"], float(be.max()) if be.numel() else 0.0)
                    w["roundtrip"] = max(w["roundtrip"], float(rt.max()) if rt.numel() else 0.0)
                    w["ladj"] = max(w["ladj"], float(la.max()) if la.numel() else 0.0)
                    w["nonfinite"] += int((~finite).sum())
        for (region, path), w in worst.items():
            records.append({"scale": scale, "region": region, "path": path, **w})
    return records


def main(argv=None) -> int:
    import argparse
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    torch.set_num_threads(1)
    records = measure()
    for r in records:
        print(json.dumps(r))
    print("\n| scale | region | path | forward error (eps) | backward error (eps) "
          "| round trip (eps, conditioned) | max abs ladj_f + ladj_inv | non-finite |")
    print("|---|---|---|---|---|---|---|---|")
    for r in records:
        print(f"| {r['scale']:g} | {r['region']} | {r['path']} | {r['forward']:.3g} | "
              f"{r['backward']:.3g} | {r['roundtrip']:.3g} | {r['ladj']:.3g} | {r['nonfinite']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
