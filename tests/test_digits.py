"""Tests for normflux.data.digits and the digits benchmark script."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from normflux.data import digits  # noqa: E402
from normflux.data.digits import (LEVELS, bits_per_dim, dequantize,  # noqa: E402
                                  independent_pixel_baseline, load_digits_split)

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ split
def test_split_sizes_dtype_range():
    train, test = load_digits_split()
    assert train.shape == (1500, 64) and test.shape == (297, 64)
    assert train.dtype == np.int64 and test.dtype == np.int64
    for x in (train, test):
        assert x.min() >= 0 and x.max() <= 16
    assert LEVELS == 17


def test_split_is_a_partition_of_the_data():
    from sklearn.datasets import load_digits

    full = load_digits().data.astype(np.int64)
    train, test = load_digits_split(0)
    perm = np.random.default_rng(0).permutation(1797)
    np.testing.assert_array_equal(train, full[perm[:1500]])
    np.testing.assert_array_equal(test, full[perm[1500:]])
    both = np.concatenate([train, test])
    # same multiset of rows as the full data set
    key = lambda a: np.sort(a.view([("", a.dtype)] * 64).ravel())  # noqa: E731
    np.testing.assert_array_equal(key(both), key(full))


def test_split_is_deterministic_and_seeded():
    a_tr, a_te = load_digits_split(0)
    b_tr, b_te = load_digits_split(0)
    np.testing.assert_array_equal(a_tr, b_tr)
    np.testing.assert_array_equal(a_te, b_te)
    c_tr, _ = load_digits_split(1)
    assert not np.array_equal(a_tr, c_tr)
    # returned arrays are copies: mutating one does not leak into the next call
    a_tr[0, 0] = 99
    assert load_digits_split(0)[0][0, 0] != 99


# ------------------------------------------------------------------ dequantisation
def test_dequantize_shape_dtype_range():
    train, _ = load_digits_split()
    y = dequantize(train, generator=torch.Generator().manual_seed(0))
    assert y.shape == train.shape and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    # each value stays in its own cell [x/17, (x+1)/17]
    x = torch.from_numpy(train).float()
    assert bool((y * LEVELS >= x - 1e-4).all()) and bool((y * LEVELS <= x + 1 + 1e-4).all())
    # the noise is non-trivial: fractional parts spread over [0, 1)
    frac = y * LEVELS - x
    assert 0.45 < float(frac.mean()) < 0.55


def test_dequantize_accepts_tensors_and_any_shape():
    x = torch.randint(0, 17, (3, 8, 8))
    y = dequantize(x)
    assert y.shape == (3, 8, 8) and y.dtype == torch.float32
    assert dequantize(np.zeros((0, 64), dtype=np.int64)).shape == (0, 64)


def test_dequantize_is_reproducible_with_a_generator():
    x = np.arange(17)
    a = dequantize(x, generator=torch.Generator().manual_seed(3))
    b = dequantize(x, generator=torch.Generator().manual_seed(3))
    c = dequantize(x, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("bad", [np.array([-1, 3]), np.array([0, 17]),
                                 torch.tensor([0.5, 1.0])])
def test_dequantize_rejects_out_of_range_or_fractional(bad):
    with pytest.raises(ValueError):
        dequantize(bad)


# ------------------------------------------------------------------ bits per dim
def test_bits_per_dim_formula():
    # by hand: log2(17) = ln 17 / ln 2 = 4.087462841250339
    assert bits_per_dim(0.0) == pytest.approx(4.087462841250339, abs=1e-12)
    # nll = -64 ln 2 nats per example is one bit per dim less
    assert bits_per_dim(-64 * math.log(2)) == pytest.approx(3.087462841250339, abs=1e-12)
    nll = -84.0
    assert bits_per_dim(nll) == pytest.approx(math.log2(17) + nll / (64 * math.log(2)))
    assert bits_per_dim(nll, dims=32) == pytest.approx(math.log2(17) + nll / (32 * math.log(2)))
    t = bits_per_dim(torch.tensor([0.0, -64 * math.log(2)], dtype=torch.float64))
    assert torch.allclose(t, torch.tensor([4.087462841250339, 3.087462841250339],
                                          dtype=torch.float64))


def test_bits_per_dim_matches_a_uniform_density():
    # a uniform density on [0, 1)^64 has NLL 0: its bits/dim is log2(17), the cost of
    # coding each pixel uniformly over 17 levels.
    assert bits_per_dim(0.0) == pytest.approx(math.log2(LEVELS))


# ------------------------------------------------------------------ baseline
def test_independent_pixel_baseline_is_2_42():
    assert independent_pixel_baseline() == pytest.approx(2.4208, abs=5e-4)
    assert round(independent_pixel_baseline(), 2) == 2.42


def test_independent_pixel_baseline_by_hand():
    train, test = load_digits_split()
    j = 20  # one pixel, by hand
    counts = np.bincount(train[:, j], minlength=17) + 1.0
    p = counts / counts.sum()
    assert counts.sum() == 1500 + 17
    by_hand = -np.log2(p[test[:, j]]).mean()
    # the baseline is the mean of such per-pixel values over the 64 pixels
    per_pixel = []
    for k in range(64):
        c = np.bincount(train[:, k], minlength=17) + 1.0
        per_pixel.append(-np.log2((c / c.sum())[test[:, k]]).mean())
    assert per_pixel[j] == pytest.approx(by_hand)
    assert independent_pixel_baseline() == pytest.approx(np.mean(per_pixel), abs=1e-12)
    # smoothing matters: half-counts give a slightly lower value, none gives infinity
    assert independent_pixel_baseline(alpha=0.5) < independent_pixel_baseline()
    assert math.isinf(independent_pixel_baseline(alpha=0.0))


def test_module_exports():
    for name in digits.__all__:
        assert hasattr(digits, name)


# ------------------------------------------------------------------ benchmark
PEERS = all(importlib.util.find_spec(m) is not None for m in ("zuko", "nflows"))


@pytest.mark.slow
@pytest.mark.skipif(not PEERS, reason="benchmark peers missing: pip install 'normflux[bench]'")
def test_benchmark_quick_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["library"] for r in rows] == ["normflux", "zuko", "nflows"]
    for r in rows:
        assert {"library", "model", "test_nll", "bits_per_dim", "seconds", "params"} <= set(r)
        assert math.isfinite(r["test_nll"]) and r["params"] > 0
        assert r["bits_per_dim"] == pytest.approx(bits_per_dim(r["test_nll"]), abs=1e-3)
    assert "| library |" in proc.stdout and "(baseline)" in proc.stdout
