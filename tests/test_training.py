"""Tests of normflux.training and normflux.checkpoint: fits, reproducibility, early stopping,
divergence, atomic checkpoints and resume."""

import math
import os

import pytest
import torch

from normflux import checkpoint, models, targets
from normflux.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from normflux.data import load_dataset, two_moons
from normflux.training import DivergenceError, evaluate_nll, fit_to_data, fit_to_target


@pytest.fixture(autouse=True)
def _one_thread():
    """Small models: one thread is as fast and does not fight the other xdist worker."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _gauss(n=256, d=2, seed=0, scale=1.0):
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- fit_to_data
def test_two_moons_fit_reaches_reference_nll():
    """nsf, 4 layers, hidden (32, 32), 25 epochs of batch 128 at lr 3e-3 on make_moons(2000).

    Reference run (2 CPU cores, torch 2.13, seeds 0/1/2): test NLL 0.418 / 0.456 / 0.436
    nats (best validation epochs 21 / 18 / 19), 11-15 s each. A Gaussian fit to the same
    data scores about 2.0 nats, an untrained flow more. Bound: 0.60 nats (reference + ~0.15).
    """
    ds = load_dataset("two-moons")
    flow = models.build("nsf", 2, layers=4, hidden=(32, 32), standardize=True, seed=0)
    models.fit_standardization(flow, ds.train)
    before = evaluate_nll(flow, ds.test)
    hist = fit_to_data(flow, ds.train, epochs=25, batch_size=128, lr=3e-3, patience=10, seed=0,
                       progress=False)
    nll = evaluate_nll(flow, ds.test)
    assert before > 1.5
    assert nll < 0.60, (nll, hist["best_epoch"])
    assert len(hist["train_loss"]) == hist["epochs"] == len(hist["val_loss"])
    assert hist["train_loss"][-1] < hist["train_loss"][0]


def test_same_seed_same_weights_and_different_seed_differs():
    data = _gauss(300, 3)
    runs = []
    for seed in (4, 4, 5):
        flow = models.build("nsf", 3, layers=2, hidden=(8,), seed=0)
        fit_to_data(flow, data, epochs=3, batch_size=64, lr=1e-2, seed=seed, progress=False)
        runs.append(flow)
    assert _state_equal(runs[0], runs[1])
    assert not _state_equal(runs[0], runs[2])


def test_global_rng_untouched_and_progress_off_is_silent(capsys):
    state = torch.random.get_rng_state()
    flow = models.build("realnvp", 2, layers=2, hidden=(8,))
    fit_to_data(flow, _gauss(100), epochs=2, batch_size=50, progress=False)
    fit_to_target(flow, targets.RingOfGaussians(), steps=3, batch_size=16, progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)
    out, err = capsys.readouterr()
    assert out == "" and err == ""


def test_unstandardized_data_for_a_built_model_draws_a_warning(recwarn):
    """A user's report: build("nsf") fitted to two moons * 50 + 300 kept a flat loss of 1e5
    nats without a word (its splines are the identity outside [-3, 3])."""
    data = 50 * two_moons(400, seed=0) + 300
    flow = models.build("nsf", 2, layers=2, hidden=(8,), seed=0)
    with pytest.warns(UserWarning, match=r"100% of the data's real-coordinate values lie "
                      r"outside \[-3, 3\].*standardize=True.*fit_standardization"):
        fit_to_data(flow, data, epochs=1, progress=False)
    # standardised data, a set standardisation, or circular coordinates: no warning
    fit_to_data(flow, (data - data.mean(0)) / data.std(0), epochs=1, progress=False)
    flow = models.build("nsf", 2, layers=2, hidden=(8,), seed=0, standardize=True)
    models.fit_standardization(flow, data)
    fit_to_data(flow, data, epochs=1, progress=False)
    flow = models.build("nsf", 2, layers=2, hidden=(8,), seed=0, domains=("circle", "circle"))
    fit_to_data(flow, torch.rand(400, 2) * 6.2 - 3.1, epochs=1, progress=False)
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_progress_bar_goes_to_stderr(capsys):
    flow = models.build("realnvp", 2, layers=1, hidden=(4,))
    fit_to_data(flow, _gauss(64), epochs=2, batch_size=32, progress=True)
    out, err = capsys.readouterr()
    assert out == "" and "fit" in err


def test_best_weights_restored_and_early_stopping():
    """Train on a narrow Gaussian, validate on a wide one: validation NLL gets worse as the
    flow sharpens, so training must stop ``patience`` epochs after the best epoch and end
    with the best epoch's weights."""
    train = _gauss(512, 2, seed=0, scale=0.05)
    val = _gauss(256, 2, seed=1, scale=3.0)
    flow = models.build("nsf", 2, layers=2, hidden=(16,))
    hist = fit_to_data(flow, train, epochs=40, batch_size=64, lr=1e-2, val_data=val,
                       patience=3, seed=0, progress=False)
    assert hist["stopped_early"]
    assert hist["epochs"] == hist["best_epoch"] + 3 < 40
    assert hist["best_val_loss"] == min(hist["val_loss"])
    assert evaluate_nll(flow, val) == pytest.approx(hist["best_val_loss"], abs=1e-5)


def test_val_fraction_zero_keeps_final_weights():
    flow = models.build("realnvp", 2, layers=1, hidden=(4,))
    hist = fit_to_data(flow, _gauss(64), epochs=2, batch_size=32, val_fraction=0.0,
                       progress=False)
    assert hist["val_loss"] == [] and hist["best_epoch"] is None and hist["epochs"] == 2


def test_dequantize_callback_fresh_noise_each_epoch():
    calls = []

    def deq(x, g):
        u = torch.rand(x.shape, generator=g)
        calls.append(u[0, 0].item())
        return (x + u) / 4

    data = torch.randint(0, 4, (200, 2)).float()
    flow = models.build("nsf", 2, layers=1, hidden=(8,))
    fit_to_data(flow, data, epochs=3, batch_size=100, dequantize=deq, progress=False)
    assert len(calls) == 1 + 3                                   # validation once, 3 epochs
    assert len(set(calls)) == 4


def test_divergence_error_names_epoch_and_value():
    flow = models.build("nsf", 2, layers=1, hidden=(8,))

    def poison(epoch, hist):
        if epoch == 1:
            with torch.no_grad():
                next(flow.parameters()).fill_(float("nan"))

    with pytest.raises(DivergenceError, match=r"epoch 2, step \d+: loss is nan") as e:
        fit_to_data(flow, _gauss(128), epochs=4, batch_size=64, val_fraction=0, progress=False,
                    callback=poison)
    assert isinstance(e.value, RuntimeError) and e.value.epoch == 2 and math.isnan(e.value.value)


def test_fit_to_target_diverges_clearly_on_bad_target():
    class Bad:
        def log_prob(self, x):
            return torch.where(x[:, 0] > 10, 0.0, -math.inf) + x.sum(1) * 0

    flow = models.build("realnvp", 2, layers=1, hidden=(4,))
    with pytest.raises(DivergenceError, match=r"step 1: loss is inf"):
        fit_to_target(flow, Bad(), steps=5, batch_size=8, progress=False)


def test_fit_to_target_cylinder_short_run():
    target = targets.Cylinder()
    runs = []
    for _ in range(2):
        flow = models.build("nsf", 2, domains=target.domains, layers=2, hidden=(16, 16))
        hist = fit_to_target(flow, target, steps=40, batch_size=128, lr=3e-3, seed=1,
                             progress=False)
        runs.append(flow)
    assert len(hist["loss"]) == 40 and hist["steps"] == 40
    # the loss estimates KL(q || p) >= 0 (log Z = 0): it must fall
    assert sum(hist["loss"][-10:]) / 10 < sum(hist["loss"][:5]) / 5
    assert _state_equal(runs[0], runs[1])


def test_bad_settings_raise_value_error():
    flow = models.build("realnvp", 2, layers=1, hidden=(4,))
    with pytest.raises(ValueError):
        fit_to_data(flow, _gauss(10), epochs=0)
    with pytest.raises(ValueError, match="lr"):
        fit_to_data(flow, _gauss(10), epochs=1, lr=0)
    with pytest.raises(ValueError, match="context"):
        fit_to_data(flow, _gauss(10), torch.zeros(5, 1), epochs=1)
    with pytest.raises(ValueError):
        fit_to_target(flow, targets.Cylinder(), steps=0)


# ---------------------------------------------------------------------------- checkpoints
def _trained_flow(context=None):
    flow = models.build("nsf", 3, context=context, layers=2, hidden=(8,), standardize=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    ctx = None if context is None else torch.randn(50, context, generator=g) * 3 + 1
    models.fit_standardization(flow, torch.randn(50, 3, generator=g) * 2 + 5, ctx)
    return flow


def test_checkpoint_round_trip(tmp_path):
    flow = _trained_flow(context=2)
    path = save_checkpoint(tmp_path / "sub" / "m.pt", flow,
                           extra={"history": [1.0, 2.0], "note": "hi", "t": torch.ones(2)})
    loaded, extra = load_checkpoint(path)
    assert extra["history"] == [1.0, 2.0] and extra["note"] == "hi"
    assert loaded.config == flow.config
    x, c = torch.randn(4, 3), torch.randn(4, 2)
    torch.testing.assert_close(loaded.log_prob(x, c), flow.log_prob(x, c), rtol=0, atol=0)
    assert [p.name for p in tmp_path.joinpath("sub").iterdir()] == ["m.pt"]


def test_checkpoint_errors(tmp_path):
    with pytest.raises(TypeError, match=r"takes the path first: save_checkpoint\(path, flow\)"):
        save_checkpoint(models.build("realnvp", 2, layers=1, hidden=(4,)), tmp_path / "m.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"this is not a checkpoint")
    with pytest.raises(CheckpointError, match="not a normflux checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"weights": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="not a normflux checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    flow = _trained_flow()
    save_checkpoint(tmp_path / "ok.pt", flow)
    payload = torch.load(tmp_path / "ok.pt", weights_only=True)
    payload["config"]["layers"] = 3
    torch.save(payload, tmp_path / "mismatch.pt")
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "mismatch.pt")
    with pytest.raises(TypeError, match="NumPy"):
        import numpy as np
        save_checkpoint(tmp_path / "np.pt", flow, extra={"a": np.zeros(2)})
    with pytest.raises(TypeError, match="config"):
        save_checkpoint(tmp_path / "plain.pt", torch.nn.Linear(2, 2))


def test_crash_mid_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    old = _trained_flow()
    save_checkpoint(path, old, extra={"version": "old"})
    size = path.stat().st_size
    real_save = torch.save

    def crashing_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04partial bytes of a zip")   # a truncated file, then the crash
        f.flush()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crashing_save)
    new = models.build("nsf", 3, layers=2, hidden=(8,), standardize=True, seed=9)
    with pytest.raises(OSError, match="simulated"):
        save_checkpoint(path, new, extra={"version": "new"})
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]          # no temp file left behind
    assert path.stat().st_size == size
    flow, extra = load_checkpoint(path)
    assert extra == {"version": "old"}
    x = torch.randn(3, 3)
    torch.testing.assert_close(flow.log_prob(x), old.log_prob(x), rtol=0, atol=0)


def test_resume_equals_uninterrupted(tmp_path):
    """10 Adam steps == 5 steps, save (weights + optimizer state), load, 5 more steps."""
    g = torch.Generator().manual_seed(0)
    batches = [torch.randn(32, 3, generator=g) * 2 + 1 for _ in range(10)]

    def steps(flow, opt, bs):
        for xb in bs:
            opt.zero_grad()
            flow.forward_kld(xb).backward()
            opt.step()

    ref = _trained_flow()
    resumed = models.build(**ref.config)
    resumed.load_state_dict(ref.state_dict())

    opt = torch.optim.Adam(ref.parameters(), lr=1e-2)
    steps(ref, opt, batches)

    opt = torch.optim.Adam(resumed.parameters(), lr=1e-2)
    steps(resumed, opt, batches[:5])
    save_checkpoint(tmp_path / "mid.pt", resumed, extra={"optimizer": opt.state_dict(), "step": 5})
    del resumed, opt
    flow, extra = load_checkpoint(tmp_path / "mid.pt")
    flow.train()
    opt = torch.optim.Adam(flow.parameters(), lr=1e-2)
    opt.load_state_dict(extra["optimizer"])
    assert extra["step"] == 5
    steps(flow, opt, batches[5:])

    for (k, p), q in zip(ref.state_dict().items(), flow.state_dict().values()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=k)
    assert checkpoint.VERSION == 1
