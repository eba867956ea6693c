"""Bad input to the flow, the training loops and the metrics gets a clear error naming the
argument (non-integer counts, bad settings, complex data, empty batches, targets returning
the wrong shape, lists instead of tensors, context rows that do not match), and the valid
calls next to each bad one still work."""

import math

import pytest
import torch
from torch import nn

import normflux as nf
from normflux import metrics, models, training


def _flow(context=None):
    return models.build("realnvp", features=2, layers=2, hidden=(8, 8), context=context)


class _Target:
    """A target whose log_prob is ``fn(x)``."""

    def __init__(self, fn):
        self.fn = fn

    def log_prob(self, x):
        return self.fn(x)


_GOOD = _Target(lambda x: -0.5 * (x ** 2).sum(-1))
_FIT = dict(epochs=1, batch_size=16, progress=False)


# ------------------------------------------------------------------ integer counts
@pytest.mark.parametrize("n", [2.5, "3", None, True])
def test_sample_counts_must_be_integers(n):
    flow = _flow()
    with pytest.raises(ValueError, match="n must be an integer"):
        flow.sample(n)
    with pytest.raises(ValueError, match="n must be an integer"):
        flow.sample_and_log_prob(n)
    with pytest.raises(ValueError, match="n must be an integer"):
        flow.reverse_kld(_GOOD, n)


def test_valid_sample_counts_still_work():
    flow = _flow()
    assert flow.sample(0).shape == (0, 2)
    x, lp = flow.sample_and_log_prob(0)
    assert x.shape == (0, 2) and lp.shape == (0,)
    assert flow.sample(3.0).shape == (3, 2)
    with pytest.raises(ValueError, match="n must be non-negative"):
        flow.sample(-1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=2.5), "epochs must be an integer"),
    (dict(epochs=0), "epochs must be >= 1"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(lr="1e-3"), "lr must be a finite number"),
    (dict(lr=0), "lr must be > 0"),
    (dict(patience=1.5), "patience must be an integer"),
    (dict(seed=0.5), "seed must be an integer"),
    (dict(val_fraction=1.0), "val_fraction must be < 1"),
    (dict(weight_decay=-1.0), "weight_decay must be >= 0"),
    (dict(clip=-1), "clip must be > 0"),
    (dict(clip="5"), "clip must be a finite number"),
])
def test_fit_to_data_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.fit_to_data(_flow(), torch.randn(40, 2), **{**_FIT, **kwargs})


@pytest.mark.parametrize("kwargs, match", [
    (dict(steps=2.5), "steps must be an integer"),
    (dict(steps=0), "steps must be >= 1"),
    (dict(batch_size=2.5), "batch_size must be an integer"),
    (dict(lr="1e-3"), "lr must be a finite number"),
    (dict(seed=None), "seed must be an integer"),
    (dict(clip=-1), "clip must be > 0"),
])
def test_fit_to_target_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        training.fit_to_target(_flow(), _GOOD, **{"steps": 2, "batch_size": 8,
                                                  "progress": False, **kwargs})


def test_fit_to_target_and_fit_to_data_share_the_clip_check():
    msgs = []
    for fit in (lambda: training.fit_to_data(_flow(), torch.randn(40, 2), clip=-1, **_FIT),
                lambda: training.fit_to_target(_flow(), _GOOD, steps=2, clip=-1, progress=False)):
        with pytest.raises(ValueError, match="clip") as e:
            fit()
        msgs.append(str(e.value))
    assert msgs[0] == msgs[1]


def test_valid_training_settings_still_work():
    flow = _flow()
    hist = training.fit_to_data(flow, torch.randn(40, 2), epochs=2.0, batch_size=16,
                                clip=None, patience=None, seed=3, progress=False)
    assert hist["epochs"] == 2
    hist = training.fit_to_target(flow, _GOOD, steps=3, batch_size=8.0, clip=1.0,
                                  progress=False)
    assert hist["steps"] == 3 and len(hist["loss"]) == 3
    with pytest.raises(ValueError, match="batch_size must be an integer"):
        training.evaluate_nll(flow, torch.randn(10, 2), batch_size=2.5)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        training.evaluate_nll(flow, torch.randn(10, 2), batch_size=0)
    assert training.evaluate_nll(flow, torch.randn(10, 2), batch_size=3) > 0
    with pytest.raises(ValueError, match="total_steps must be an integer"):
        training.make_optimizer(flow, 1e-3, 2.5)


# ------------------------------------------------------------------ data dtypes
@pytest.mark.parametrize("dtype", [torch.cfloat, torch.bool])
def test_complex_and_bool_data_are_rejected(dtype):
    flow = _flow()
    bad = torch.randn(40, 2).to(dtype)
    with pytest.raises(ValueError, match=f"data has dtype {dtype}"):
        training.fit_to_data(flow, bad, **_FIT)
    with pytest.raises(ValueError, match=f"data has dtype {dtype}"):
        training.evaluate_nll(flow, bad)
    cflow = _flow(context=1)
    with pytest.raises(ValueError, match=f"context has dtype {dtype}"):
        training.fit_to_data(cflow, torch.randn(40, 2), torch.randn(40, 1).to(dtype), **_FIT)


def test_float64_and_integer_data_are_converted_as_documented():
    flow = _flow()
    assert training.fit_to_data(flow, torch.randn(40, 2, dtype=torch.float64), **_FIT)["epochs"] == 1
    assert training.fit_to_data(flow, torch.randint(0, 4, (40, 2)), **_FIT)["epochs"] == 1
    assert math.isfinite(training.evaluate_nll(flow, torch.randint(0, 4, (40, 2))))


# ------------------------------------------------------------------ empty batches
def test_empty_batches_are_rejected_by_the_losses():
    flow = _flow()
    with pytest.raises(ValueError, match="empty batch"):
        flow.forward_kld(torch.randn(0, 2))
    with pytest.raises(ValueError, match="n must be >= 1"):
        flow.reverse_kld(_GOOD, 0)
    assert flow.log_prob(torch.randn(0, 2)).shape == (0,)  # log_prob of nothing is fine
    assert torch.isfinite(flow.forward_kld(torch.randn(3, 2)))


# ------------------------------------------------------------------ target's log_prob
@pytest.mark.parametrize("fn, shape", [
    (lambda x: x.sum(), r"\(\)"),
    (lambda x: x, r"\(8, 2\)"),
    (lambda x: (x ** 2).sum(-1, keepdim=True), r"\(8, 1\)"),
])
def test_reverse_kld_checks_the_target_shape(fn, shape):
    flow = _flow()
    with pytest.raises(ValueError, match=rf"target.log_prob returned shape {shape}.*\(8,\)"):
        flow.reverse_kld(_Target(fn), 8)
    with pytest.raises(ValueError, match=rf"target.log_prob returned shape {shape}"):
        training.fit_to_target(flow, _Target(fn), steps=2, batch_size=8, progress=False)


def test_target_must_return_a_tensor_and_have_log_prob():
    flow = _flow()
    with pytest.raises(TypeError, match="target.log_prob must return a torch.Tensor"):
        flow.reverse_kld(_Target(lambda x: 0.0), 8)
    with pytest.raises(TypeError, match="target must have a log_prob"):
        training.fit_to_target(flow, object(), steps=2, progress=False)
    assert torch.isfinite(flow.reverse_kld(_GOOD, 8))


def test_conditional_reverse_kld_expects_one_value_per_sample_and_context():
    flow = _flow(context=1)

    class T:
        def log_prob(self, x, context):
            return -0.5 * (x ** 2).sum(-1)

    assert torch.isfinite(flow.reverse_kld(T(), 4, context=torch.randn(3, 1)))

    class Bad:
        def log_prob(self, x, context):
            return -0.5 * (x ** 2).sum()

    with pytest.raises(ValueError, match=r"returned shape \(\).*\(4, 3\)"):
        flow.reverse_kld(Bad(), 4, context=torch.randn(3, 1))


# ------------------------------------------------------------------ metrics
@pytest.mark.parametrize("fn", [metrics.effective_sample_size, metrics.log_normalizer])
def test_weight_metrics_need_a_non_empty_1d_tensor(fn):
    with pytest.raises(ValueError, match=r"log_w must be 1-D \(n,\), got shape \(3, 4\)"):
        fn(torch.zeros(3, 4))
    with pytest.raises(ValueError, match="log_w must be 1-D"):
        fn(torch.tensor(0.0))
    with pytest.raises(ValueError, match="log_w is empty"):
        fn(torch.tensor([]))
    with pytest.raises(TypeError, match="log_w must be a torch.Tensor"):
        fn([0.0, 1.0])
    with pytest.raises(ValueError, match="log_w must be floating point"):
        fn(torch.tensor([0, 1]))
    assert fn(torch.zeros(4)).shape == ()


def test_bits_per_dim_checks_dims_and_levels():
    with pytest.raises(ValueError, match="dims must be >= 1, got 0"):
        metrics.bits_per_dim(1.0, 0)
    with pytest.raises(ValueError, match="dims must be >= 1, got -1"):
        metrics.bits_per_dim(1.0, -1)
    with pytest.raises(ValueError, match="dims must be an integer"):
        metrics.bits_per_dim(1.0, 2.5)
    with pytest.raises(ValueError, match="levels must be >= 1, got 0"):
        metrics.bits_per_dim(1.0, 4, levels=0)
    with pytest.raises(TypeError, match="nll must be a real number or a torch.Tensor"):
        metrics.bits_per_dim("1.0", 4)
    assert metrics.bits_per_dim(4 * math.log(2), 4) == pytest.approx(1.0)
    assert metrics.bits_per_dim(0.0, 4, levels=1) == 0.0
    assert metrics.bits_per_dim(0.0, 4, levels=256) == pytest.approx(8.0)
    assert metrics.bits_per_dim(math.inf, 4) == math.inf


# ------------------------------------------------------------------ lists, wrong types
def test_lists_instead_of_tensors_are_type_errors():
    flow = _flow()
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        flow.log_prob(torch.randn(1, 2), [[1.0, 2.0]])
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        flow.sample(2, [[1.0, 2.0]])
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        flow.distribution([1.0])
    with pytest.raises(TypeError, match="data must be a torch.Tensor"):
        training.evaluate_nll(flow, [[0.0, 1.0]])
    cflow = _flow(context=1)
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        training.evaluate_nll(cflow, torch.randn(3, 2), [[0.0]])
    with pytest.raises(TypeError, match="context must be a torch.Tensor"):
        cflow.log_prob(torch.randn(1, 2), [[1.0]])
    # fit_to_data documents array-likes: they are converted
    assert training.fit_to_data(flow, torch.randn(40, 2).tolist(), **_FIT)["epochs"] == 1


def test_flow_constructor_checks_its_arguments():
    base = nf.DiagGaussian(2)
    with pytest.raises(TypeError, match="transform must be a normflux Transform.*Identity"):
        nf.Flow(nn.Identity(), base)
    with pytest.raises(TypeError, match="base must be a normflux BaseDistribution"):
        nf.Flow(nf.Chain([]), torch.distributions.Normal(0.0, 1.0))
    with pytest.raises(ValueError, match="context_features must be an integer"):
        nf.Flow(nf.Chain([]), base, context_features=2.5)
    with pytest.raises(ValueError, match="context_features must be >= 1"):
        nf.Flow(nf.Chain([]), base, context_features=0)
    assert nf.Flow(nf.Chain([]), base, context_features=3).context_features == 3


# ------------------------------------------------------------------ context rows
def test_evaluate_nll_checks_context_rows_before_chunking():
    flow = _flow(context=1)
    x = torch.randn(30, 2)
    with pytest.raises(ValueError, match="data has 30 rows but context has 14"):
        training.evaluate_nll(flow, x, torch.randn(14, 1), batch_size=16)
    with pytest.raises(ValueError, match="data has 30 rows but context has 31"):
        training.evaluate_nll(flow, x, torch.randn(31, 1), batch_size=8)
    # one row is shared by every example, whatever the chunk size
    c = torch.randn(1, 1)
    full = training.evaluate_nll(flow, x, c.expand(30, 1))
    for ctx, bs in [(c, 8), (c, 4096), (c[0], 7)]:
        assert training.evaluate_nll(flow, x, ctx, batch_size=bs) == pytest.approx(full, abs=1e-5)


def test_one_dimensional_context_is_named_as_such():
    flow = _flow(context=1)
    with pytest.raises(ValueError, match=r"context must be 2-D \(N, C\).*shape \(40,\)"):
        training.fit_to_data(flow, torch.randn(40, 2), torch.randn(40), **_FIT)
    with pytest.raises(ValueError, match=r"1 features, got a 1-D context of shape \(36,\).*"
                                         r"reshape\(-1, 1\)"):
        flow.log_prob(torch.randn(36, 2), torch.randn(36))
    with pytest.raises(ValueError, match=r"data has 40 rows but context has 39"):
        training.fit_to_data(flow, torch.randn(40, 2), torch.randn(39, 1), **_FIT)
    assert training.fit_to_data(flow, torch.randn(40, 2), torch.randn(40, 1), **_FIT)["epochs"] == 1


def test_validation_set_is_checked_like_the_data():
    flow = _flow(context=1)
    x, c = torch.randn(40, 2), torch.randn(40, 1)
    with pytest.raises(ValueError, match="val_data has 10 rows but val_context has 9"):
        training.fit_to_data(flow, x, c, val_data=torch.randn(10, 2),
                             val_context=torch.randn(9, 1), **_FIT)
    with pytest.raises(ValueError, match="val_context was given without val_data"):
        training.fit_to_data(flow, x, c, val_context=torch.randn(9, 1), **_FIT)
    with pytest.raises(ValueError, match="val_data has dtype torch.complex64"):
        training.fit_to_data(flow, x, c, val_data=torch.randn(10, 2, dtype=torch.cfloat),
                             val_context=torch.randn(10, 1), **_FIT)
    bad = torch.randn(10, 2)
    bad[2, 0] = float("nan")
    with pytest.raises(ValueError, match=r"val_data contains NaN or Inf \(rows \[2\]"):
        training.fit_to_data(flow, x, c, val_data=bad, val_context=torch.randn(10, 1), **_FIT)
    hist = training.fit_to_data(flow, x, c, val_data=torch.randn(10, 2),
                                val_context=torch.randn(10, 1), **_FIT)
    assert len(hist["val_loss"]) == 1


def test_loops_name_a_wrong_flow_or_callback():
    """Something other than a flow (or an adapter with its methods) and non-callable hooks:
    a TypeError naming them, not an AttributeError from inside the loop."""
    from normflux.targets import TwoMoons
    from normflux.training import evaluate_nll, fit_to_data, fit_to_target

    data = torch.randn(40, 2)
    with pytest.raises(TypeError, match="flow must be an nn.Module with log_prob"):
        evaluate_nll(nn.Linear(2, 2), data)
    with pytest.raises(TypeError, match="flow must be an nn.Module with forward_kld"):
        fit_to_data(object(), data, epochs=1, progress=False)
    with pytest.raises(TypeError, match="flow must be an nn.Module with reverse_kld"):
        fit_to_target(nn.Linear(2, 2), TwoMoons(), steps=1, progress=False)
    flow = nf.models.build("realnvp", features=2, layers=2, hidden=(8, 8))
    with pytest.raises(TypeError, match="callback must be callable"):
        fit_to_data(flow, data, epochs=1, progress=False, callback=3)
    with pytest.raises(TypeError, match="dequantize must be callable"):
        fit_to_data(flow, data, epochs=1, progress=False, dequantize="yes")
