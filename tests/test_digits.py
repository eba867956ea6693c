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
from normflux.data.digits import (  # noqa: E402
    LEVELS,
    bits_per_dim,
    dequantize,
    independent_pixel_baseline,
    load_digits_split,
)

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
needs_peers = pytest.mark.skipif(not PEERS,
                                 reason="benchmark peers missing: pip install 'normflux[bench]'")


@pytest.fixture(scope="module")
def bench():
    """``benchmarks/digits.py`` as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("digits_benchmark",
                                                  ROOT / "benchmarks" / "digits.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def tiny(bench, **kw):
    """A small, fast configuration of the benchmark."""
    base = dict(layers=2, hidden=(8, 8), bins=4, epochs=2, batch_size=256, test_draws=2,
                max_seconds=60.0)
    return bench.Config(**{**base, **kw})


def test_benchmark_defaults_are_the_cli_defaults(bench):
    import inspect

    from normflux.cli import TRAIN_DEFAULTS, build_parser
    from normflux.models import build
    from normflux.training import fit_to_data

    cfg = bench.Config()
    d = TRAIN_DEFAULTS["digits"]
    assert d["model"] == "nsf" and cfg.models == ("nsf", "maf", "nsf-ar")
    for key in ("layers", "bins", "epochs", "batch_size", "lr", "patience"):
        assert getattr(cfg, key) == d[key], key
    assert cfg.hidden == tuple(d["hidden"])
    # what the CLI leaves to build / fit_to_data / its parser
    assert cfg.tail_bound == inspect.signature(build).parameters["tail_bound"].default
    fit = inspect.signature(fit_to_data).parameters
    assert cfg.clip == fit["clip"].default and cfg.val_fraction == fit["val_fraction"].default
    assert cfg.threads == build_parser().parse_args(["train", "--data", "digits"]).threads
    assert cfg.libraries == ("normflux", "zuko", "nflows")


def test_parse_overrides_and_models(bench):
    cfg = bench.parse(["--models", "maf,nsf-ar", "--libraries", "zuko", "nflows", "--hidden",
                       "32", "--epochs", "5", "--lr", "0.01", "--max-seconds", "7",
                       "--tail-bound", "4", "--layers", "3", "--bins", "6", "--batch-size",
                       "64", "--patience", "2", "--test-draws", "3", "--threads", "2",
                       "--seed", "1", "--clip", "1"])
    assert cfg.models == ("maf", "nsf-ar") and cfg.libraries == ("zuko", "nflows")
    assert cfg.hidden == (32, 32) and cfg.epochs == 5 and cfg.lr == 0.01
    assert cfg.max_seconds == 7.0 and cfg.tail_bound == 4.0 and cfg.layers == 3
    assert (cfg.bins, cfg.batch_size, cfg.patience, cfg.test_draws, cfg.threads, cfg.seed,
            cfg.clip) == (6, 64, 2, 3, 2, 1, 1.0)
    assert bench.parse(["--hidden", "32", "48"]).hidden == (32, 48)
    assert bench.parse(["--models", "nsf-ar,nsf-ar"]).models == ("nsf-ar",)
    assert bench.parse([]).models == ("nsf", "maf", "nsf-ar")
    q = bench.parse(["--quick", "--epochs", "3"])
    assert q.epochs == 3 and q.test_draws == 2 and q.layers == bench.Config().layers
    for bad in (["--models", "glow"], ["--models", ","], ["--libraries", "pyro"]):
        with pytest.raises(SystemExit):
            bench.parse(bad)


class _Captured(Exception):
    pass


@pytest.mark.parametrize("family", ["nsf", "maf", "nsf-ar"])
def test_normflux_rows_are_the_cli_command(bench, family, tmp_path, monkeypatch):
    """The normflux row of each family trains exactly what ``normflux train --data digits
    --model FAMILY`` trains: same weights, standardisation, data and fit_to_data call."""
    import inspect

    import normflux.training
    from normflux.cli import build_parser

    defaults = inspect.signature(normflux.training.fit_to_data).parameters
    calls = []

    def capture(flow, data, *args, **kwargs):
        calls.append((flow, data, args, kwargs))
        raise _Captured

    monkeypatch.setattr(normflux.training, "fit_to_data", capture)  # the CLI's import
    monkeypatch.setattr(bench, "fit_to_data", capture)
    args = build_parser().parse_args(["train", "--data", "digits", "--model", family,
                                      "--out", str(tmp_path), "--quiet"])
    with pytest.raises(_Captured):
        args.func(args)
    cfg = bench.Config()
    data = bench.make_data(cfg)
    m = bench.BUILDERS["normflux"](family, cfg, data)
    assert m.flow is m.module
    with pytest.raises(_Captured):
        bench.fit(m.flow, data, cfg, "test", log=lambda msg: None)
    (cli_flow, cli_data, cli_args, cli_kw), (b_flow, b_data, b_args, b_kw) = calls
    assert b_flow.config == cli_flow.config
    a, b = cli_flow.state_dict(), b_flow.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the peers' adapter standardises with the very same numbers
    assert torch.equal(b_flow.standardizer().mean, data.mean)
    assert torch.equal(b_flow.standardizer().std, data.std)
    assert torch.equal(cli_data, b_data) and cli_data.dtype == b_data.dtype
    assert cli_args in ((), (None,)) and b_args == ()
    cli_kw = {k: v for k, v in cli_kw.items() if k not in ("progress", "context")}
    for k, v in cli_kw.items():
        assert b_kw[k] == v, k
    for k in set(b_kw) - set(cli_kw) - {"progress", "callback"}:
        assert b_kw[k] == defaults[k].default, k


def test_test_draws_start_with_the_cli_draw(bench):
    from normflux.data import load_dataset

    cfg = bench.Config(test_draws=3)
    draws = bench.dequantized_test_sets(bench.make_data(cfg), cfg)
    x_cli, _ = load_dataset("digits").split("test", seed=cfg.seed)
    assert len(draws) == 3 and torch.equal(draws[0], x_cli)
    assert not torch.equal(draws[0], draws[1])


@needs_peers
def test_every_library_builds_matched_models(bench):
    cfg = bench.Config()
    data = bench.make_data(cfg)
    x = dequantize(data.train[:16], generator=torch.Generator().manual_seed(0))
    eff = {}
    for family in bench.FAMILIES:
        for lib in bench.LIBRARIES:
            torch.manual_seed(0)
            m = bench.BUILDERS[lib](family, cfg, data)
            raw, eff[lib, family] = bench.count_params(m.module)
            assert raw >= eff[lib, family] > 0
            lp = m.flow.log_prob(x)
            assert lp.shape == (16,) and bool(torch.isfinite(lp).all())
            assert m.library == lib and m.family == family and lib in m.name
    D = 64
    lu = D * (D - 1) + 2 * D  # LULinear: two strict triangles, log-diagonal, bias
    assert eff["normflux", "nsf"] == eff["nflows", "nsf"]
    # zuko's coupling also learns an unconditional spline for the conditioning half
    # (output biases of its 32 masked-out rows: 32 * 23 per layer)
    assert eff["zuko", "nsf"] - eff["normflux", "nsf"] == cfg.layers * 32 * (3 * cfg.bins - 1)
    assert eff["normflux", "maf"] == eff["zuko", "maf"] == eff["nflows", "maf"]
    assert eff["normflux", "nsf-ar"] == eff["nflows", "nsf-ar"]
    assert eff["normflux", "nsf-ar"] - eff["zuko", "nsf-ar"] == (cfg.layers - 1) * lu


@needs_peers
def test_peer_couplings_use_the_normflux_splits(bench):
    cfg = tiny(bench, layers=4)
    data = bench.make_data(cfg)
    splits = bench.coupling_splits(bench.build_normflux_flow("nsf", cfg))
    assert len(splits) == 4 and all(len(b) == 32 for b in splits)
    assert len({tuple(sorted(b.tolist())) for b in splits}) > 1  # permutations act
    z = bench.build_zuko("nsf", cfg, data).module
    for t, b in zip(z.transform.transforms, splits):
        # passes=2: coordinates with order // 32 == 1 are the transformed ones
        assert sorted(torch.nonzero(t.order == 1).flatten().tolist()) == sorted(b.tolist())
    n = bench.build_nflows("nsf", cfg, data).module
    for t, b in zip(n._transform._transforms, splits):
        assert sorted(t.transform_features.tolist()) == sorted(b.tolist())
        assert t.transform_net.hidden_features == cfg.hidden[-1]


@needs_peers
def test_zuko_nsf_ar_is_zuko_NSF_with_the_bound(bench):
    """Built with bound 5, the zuko NSF-AR row is literally ``zuko.flows.NSF``."""
    import zuko

    cfg = tiny(bench, tail_bound=5.0)
    data = bench.make_data(cfg)
    torch.manual_seed(3)
    ours = bench.build_zuko("nsf-ar", cfg, data).module
    torch.manual_seed(3)
    ref = zuko.flows.NSF(64, bins=cfg.bins, transforms=cfg.layers, hidden_features=cfg.hidden)
    a, b = ours.state_dict(), ref.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    s = torch.randn(5, 64) * 4
    assert torch.allclose(ours().log_prob(s), ref().log_prob(s))
    # and with bound 3 it differs only in the bound
    cfg3 = tiny(bench)
    torch.manual_seed(3)
    ours3 = bench.build_zuko("nsf-ar", cfg3, data).module
    assert ours3.state_dict().keys() == a.keys()
    assert ours3.transform.transforms[0].univariate.keywords["bound"] == 3.0


def test_count_params_counts_masks_and_lu_triangles(bench):
    from normflux.transforms.linear import LULinear

    lu = LULinear(5)
    assert bench.count_params(lu) == (2 * 25 + 2 * 5, 2 * 10 + 2 * 5)
    cfg = tiny(bench)
    raw, eff = bench.count_params(bench.build_normflux_flow("maf", cfg))
    assert raw > eff > 0


def test_fit_stops_by_epochs_time_cap_and_early_stopping(bench):
    cfg = tiny(bench, epochs=2)
    data = bench.make_data(cfg)
    quiet = lambda msg: None  # noqa: E731
    flow = bench.build_normflux_flow("maf", cfg, data)
    info = bench.fit(flow, data, cfg, "t", quiet)
    assert info["stop"] == "epochs" and info["epochs_run"] == 2
    assert info["seconds"] > 0 and info["cpu_seconds"] > 0
    # the cap ends training after the first epoch past it, with the best weights restored
    flow = bench.build_normflux_flow("maf", cfg, data)
    capped = bench.fit(flow, data, tiny(bench, epochs=5, max_seconds=0.0), "t", quiet)
    assert capped["stop"] == "time cap" and capped["epochs_run"] == 1
    # no improvement (a learning rate too small to move float32 weights): patience ends it
    flow = bench.build_normflux_flow("maf", cfg, data)
    early = bench.fit(flow, data, tiny(bench, epochs=10, patience=1, lr=1e-30), "t", quiet)
    assert early["stop"] == "early stopping" and early["epochs_run"] == 2
    assert early["best_epoch"] == 1


def test_run_one_row(bench):
    cfg = tiny(bench)
    data = bench.make_data(cfg)
    row = bench.run_one("normflux", "nsf-ar", data, cfg, log=lambda msg: None)
    for key in ("library", "family", "model", "test_nll", "bits_per_dim", "seconds",
                "cpu_seconds", "params", "params_unmasked", "val_nll", "epochs_run",
                "best_epoch", "stop", "test_nll_first_draw", "test_nll_sd"):
        assert key in row, key
    assert row["library"] == "normflux" and row["family"] == "nsf-ar"
    assert row["bits_per_dim"] == pytest.approx(bits_per_dim(row["test_nll"]), abs=1e-3)
    assert math.isfinite(row["test_nll"]) and row["stop"] == "epochs"
    json.dumps(row)


def test_markdown_groups_by_family(bench):
    def row(lib, fam, bpd):
        nll = (bpd - math.log2(17)) * 64 * math.log(2)
        return dict(library=lib, family=fam, model="m", test_nll=nll, bits_per_dim=bpd,
                    seconds=1.0, cpu_seconds=2.0, params=10, params_unmasked=5, epochs_run=3,
                    best_epoch=2, stop="epochs")

    rows = [row("zuko", "nsf-ar", 2.2), row("normflux", "maf", 2.3),
            row("normflux", "nsf", 2.1), row("nflows", "nsf", 2.0),
            dict(library="nflows", family="maf", error="DivergenceError: boom")]
    lines = bench.markdown(rows, 2.42).splitlines()
    body = lines[2:]
    assert [ln.split("|")[1].strip() for ln in body] == [
        "NSF coupling", "NSF coupling", "MAF (affine)", "MAF (affine)", "NSF autoregressive",
        "baseline"]
    assert "**2.000**" in body[1] and "**" not in body[0]
    assert "failed: DivergenceError" in body[3] and "**" not in body[2]
    assert "**" not in body[4]  # a family of one has no winner to mark
    assert "1 / 2" in body[0] and "10 (5)" in body[0] and "3 (2), epochs" in body[0]
    assert len({ln.count("|") for ln in lines}) == 1


@pytest.mark.slow
@needs_peers
def test_benchmark_quick_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits.py"), "--quick"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["family"], r["library"]) for r in rows] == [
        (f, lib) for f in ("nsf", "maf", "nsf-ar") for lib in ("normflux", "zuko", "nflows")]
    for r in rows:
        assert {"library", "family", "model", "test_nll", "bits_per_dim", "seconds",
                "cpu_seconds", "params"} <= set(r)
        assert math.isfinite(r["test_nll"]) and r["params"] > 0
        assert r["bits_per_dim"] == pytest.approx(bits_per_dim(r["test_nll"]), abs=1e-3)
        assert r["stop"] in ("epochs", "early stopping")
    assert "| family |" in proc.stdout and "| baseline |" in proc.stdout


@pytest.mark.slow
def test_benchmark_normflux_row_reproduces_the_cli(tmp_path):
    """End to end: the benchmark's normflux NSF and ``normflux train --data digits`` (same
    epochs) give the same validation NLL and, on the first test draw, the same test NLL."""
    cli = subprocess.run([sys.executable, "-m", "normflux.cli", "train", "--data", "digits",
                          "--epochs", "2", "--quiet", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr[-3000:]
    rec = json.loads(cli.stdout.strip().splitlines()[-1])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "digits.py"),
                           "--libraries", "normflux", "--models", "nsf", "--epochs", "2",
                           "--test-draws", "2"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = json.loads(proc.stdout.splitlines()[0])
    assert row["test_nll_first_draw"] == pytest.approx(rec["test_nll"], abs=1e-3)
    assert row["val_nll"] == pytest.approx(rec["val_nll"], abs=1e-3)
    assert row["best_epoch"] == rec["best_epoch"] and row["epochs_run"] == rec["epochs_run"]
