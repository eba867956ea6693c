"""Tests of the ``normflux`` command, run as a subprocess like a user would."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd=None, timeout=300):
    """Run ``python -m normflux.cli ARGS`` with one torch thread; returns the process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("NORMFLUX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "normflux.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)


def ok_json(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def user_error(proc, *fragments):
    """Exit status 2, one ``normflux: error:`` line on stderr, no traceback."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("normflux: error: "), proc.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def test_demo_cylinder_short(tmp_path):
    out = tmp_path / "cyl"
    rec = ok_json(run("demo", "cylinder", "--steps", 50, "--seed", 0, "--out", out, "--quiet",
                      "--threads", 1))
    for key in ("reverse_kl", "forward_kl", "ess", "seconds"):
        assert isinstance(rec[key], float) and math.isfinite(rec[key]), key
    assert 0 < rec["ess"] <= 1
    # KL estimates of a 50-step fit: small but not exactly zero (reverse KL may be ~0)
    assert -0.05 < rec["reverse_kl"] < 1.0 and -0.05 < rec["forward_kl"] < 1.0
    assert rec["steps"] == 50 and rec["samples"] == 20000
    assert (out / "cylinder.png").stat().st_size > 10_000
    assert (out / "cylinder.pt").exists()
    # the demo's checkpoint is usable by `sample`
    s = ok_json(run("sample", out / "cylinder.pt", "-n", 100, "-o", tmp_path / "c.npy"))
    x = np.load(tmp_path / "c.npy")
    assert s["n"] == 100 and x.shape == (100, 2)
    assert x[:, 1].min() >= -math.pi and x[:, 1].max() < math.pi


def test_cylinder_defaults_are_one_dict():
    from normflux.cli import CYLINDER_DEFAULTS
    assert set(CYLINDER_DEFAULTS) >= {"layers", "hidden", "bins", "steps", "batch_size", "lr"}


def test_help_shows_the_defaults_it_uses():
    """Each model option's help names the default the command applies (from the one
    defaults dict of each command), and no format escape leaks into the text."""
    from normflux.cli import CYLINDER_DEFAULTS, TRAIN_DEFAULTS, build_parser
    sub = build_parser()._subparsers._group_actions[0].choices
    demo, train = (" ".join(sub[c].format_help().split()) for c in ("demo", "train"))
    assert "%%" not in train and "10% is held out" in train
    assert f"flow layers (default {CYLINDER_DEFAULTS['layers']})" in demo
    assert f"spline bins (default {CYLINDER_DEFAULTS['bins']})" in demo
    assert f"peak learning rate (default {CYLINDER_DEFAULTS['lr']})" in demo
    assert (f"flow layers (default digits {TRAIN_DEFAULTS['digits']['layers']}, two-moons "
            f"{TRAIN_DEFAULTS['two-moons']['layers']}") in train
    assert f"training epochs (default: digits {TRAIN_DEFAULTS['digits']['epochs']}" in train


@pytest.fixture(scope="module")
def moons(tmp_path_factory):
    """A small two-moons model trained through the CLI: ``(output dir, JSON record)``."""
    out = tmp_path_factory.mktemp("moons")
    rec = ok_json(run("train", "--data", "two-moons", "--epochs", 3, "--layers", 2,
                      "--hidden", 16, 16, "--out", out, "--quiet"))
    return out, rec


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A conditional model trained on a CSV with a named context column:
    ``(csv path, output dir, JSON record)``."""
    tmp = tmp_path_factory.mktemp("cond")
    rng = np.random.default_rng(0)
    c = rng.uniform(-1, 1, size=(120, 1))
    x = np.concatenate([c + 0.1 * rng.normal(size=(120, 1)), rng.normal(size=(120, 1)) * 100],
                       axis=1)
    csv = tmp / "cond.csv"
    np.savetxt(csv, np.concatenate([x, c], 1), delimiter=",", header="a,b,cond", comments="")
    out = tmp / "model"
    rec = ok_json(run("train", "--data", csv, "--context-columns", "cond", "--epochs", 2,
                      "--layers", 2, "--hidden", 8, "--out", out, "--quiet"))
    return csv, out, rec


def test_train_writes_json_checkpoint_and_picture(moons):
    out, rec = moons
    assert math.isfinite(rec["test_nll"]) and rec["n_test"] == 1000 and rec["n_train"] == 2000
    assert "bits_per_dim" not in rec and rec["epochs"] == 3 and rec["layers"] == 2
    assert (out / "model.pt").exists() and (out / "samples.png").stat().st_size > 5_000


def test_eval_reproduces_train_test_nll(moons):
    out, rec = moons
    ev = ok_json(run("eval", out / "model.pt", "--data", "two-moons"))
    assert ev["test_nll"] == pytest.approx(rec["test_nll"], abs=1e-6) and ev["n"] == 1000


def test_sample_csv_then_eval_it(moons, tmp_path):
    out, _ = moons
    ok_json(run("sample", out / "model.pt", "-n", 7, "-o", tmp_path / "s.csv"))
    lines = (tmp_path / "s.csv").read_text().splitlines()
    assert lines[0] == "x0,x1" and len(lines) == 8
    # the samples file is valid input for eval (all rows)
    ev2 = ok_json(run("eval", out / "model.pt", "--data", tmp_path / "s.csv", "--split", "all"))
    assert ev2["n"] == 7 and math.isfinite(ev2["all_nll"]) and ev2["nll"] == ev2["all_nll"]
    assert "test_nll" not in ev2  # it named the whole file's NLL before


def test_wrong_dimension_for_checkpoint(moons, tmp_path):
    out, _ = moons
    three = tmp_path / "three.npy"
    np.save(three, np.random.default_rng(0).normal(size=(30, 3)))
    user_error(run("eval", out / "model.pt", "--data", three),
               "has 2 features but", "has 3 data columns")


def test_context_columns_for_named_dataset(moons):
    out, _ = moons
    user_error(run("eval", out / "model.pt", "--data", "two-moons", "--context-columns", 0),
               "no context columns")


def test_conditional_train_eval_sample(conditional, tmp_path):
    csv, out, rec = conditional
    assert rec["context_features"] == 1 and rec["features"] == 2 and rec["n_test"] == 12
    ev = ok_json(run("eval", out / "model.pt", "--data", csv))      # stored context columns
    assert ev["test_nll"] == pytest.approx(rec["test_nll"], abs=1e-6)
    ok_json(run("sample", out / "model.pt", "-n", 5, "-o", tmp_path / "s.npy", "--context", 0.5))
    assert np.load(tmp_path / "s.npy").shape == (5, 2)


@pytest.mark.parametrize("kind", ["missing", "count"])
def test_sample_wrong_context(conditional, tmp_path, kind):
    _, out, _ = conditional
    if kind == "missing":
        user_error(run("sample", out / "model.pt", "-n", 5, "-o", tmp_path / "s.npy"),
                   "conditional on 1 context value", "--context")
    else:
        user_error(run("sample", out / "model.pt", "-n", 5, "-o", tmp_path / "s.npy",
                       "--context", 1, 2), "--context has 2 values but the model expects 1")


def test_eval_wrong_context_columns(conditional):
    csv, out, _ = conditional
    user_error(run("eval", out / "model.pt", "--data", csv, "--context-columns", "a", "cond"),
               "expects 1 context column, got 2")


@pytest.fixture
def bad_csv(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n1,2\n3,4\n5,six\n")
    return bad


@pytest.mark.parametrize("args, fragments", [
    (("train", "--data", "{bad}", "--out", "{tmp}/o"),
     ("row 4, column 2 (B, 'y')", "'six' is not a number")),
    (("train", "--data", "{tmp}/missing.csv"), ("missing.csv", "does not exist")),
    (("train", "--data", "two-moons", "--model", "glowy"), ("unknown model 'glowy'", "nsf")),
    (("demo", "cylinder", "--model", "realnvp", "--out", "{tmp}/o"), ("real coordinates only",)),
    (("eval", "{tmp}/none.pt", "--data", "two-moons"), ("does not exist",)),
    (("eval", "{bad}", "--data", "two-moons"), ("not a normflux checkpoint",)),
    (("sample", "{tmp}/none.pt", "-n", 3, "-o", "{tmp}/x.txt"), (".npy or .csv",)),
    (("train", "--data", "{tmp}/one.npy"), ("at least 2 data columns",)),
    (("train", "--data", "two-moons", "--epochs", "0"), ("--epochs", "must be positive")),
    (("train", "--data", "{tmp}/const.npy"), ("data column 2 (1-based", "constant")),
])
def test_user_errors_exit_2_without_traceback(tmp_path, bad_csv, args, fragments):
    np.save(tmp_path / "one.npy", np.zeros((20, 1)))
    np.save(tmp_path / "const.npy", np.stack([np.arange(30.0), np.ones(30)], 1))
    args = [str(a).format(bad=bad_csv, tmp=tmp_path) for a in args]
    user_error(run(*args, cwd=tmp_path), *fragments)
    assert not (tmp_path / "runs").exists()          # nothing written on a user error


@pytest.mark.slow
def test_digits_defaults_beat_histogram_baseline(tmp_path):
    """The digits defaults (TRAIN_DEFAULTS["digits"]) must beat the independent-pixel
    baseline (2.42 bits/dim) by a clear margin; reference runs in the cli module docs."""
    rec = ok_json(run("train", "--data", "digits", "--out", tmp_path / "d", "--quiet",
                      timeout=900))
    assert rec["bits_per_dim"] < 2.25, rec


@pytest.mark.parametrize("args,fragments", [
    (["train", "--data", "two-moons", "--seed", "99999999999999999999"],
     ["argument --seed", "must be in 0..4294967295"]),
    (["train", "--data", "{tmp}/big.npy"],
     ["data row 5, column 2 (B)", "1e+200", "beyond the float32 range"]),
    (["train", "--data", "{tmp}/dup.csv", "--context-columns", "a"],
     ["2 columns are named 'a'", "0-based column indices"]),
])
def test_more_user_errors_named(tmp_path, args, fragments):
    """An out-of-range seed (was 'Overflow when unpacking long long'), a finite float64
    value that float32 cannot hold (was 'standardisation data contains NaN or Inf', with
    no cell named), a context column named by a name two columns share (the first was
    taken silently)."""
    a = np.random.default_rng(0).normal(size=(50, 3))
    a[4, 1] = 1e200
    np.save(tmp_path / "big.npy", a)
    rows = np.random.default_rng(1).normal(size=(40, 3))
    (tmp_path / "dup.csv").write_text(
        "a,a,c\n" + "\n".join(",".join(f"{v:.4f}" for v in r) for r in rows) + "\n")
    args = [str(x).format(tmp=tmp_path) for x in args]
    user_error(run(*args, "--epochs", 1, "--quiet", "--out", tmp_path / "out", cwd=tmp_path),
               *fragments)
