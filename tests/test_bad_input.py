"""Bad input gets a clear error naming what is wrong (found by trying to break the library)."""

import pytest
import torch

import normflux as nf
from normflux import models, training
from normflux.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from normflux.testing import check_transform


def _flow(context=None):
    return models.build("nsf", 2, context=context, layers=2, hidden=(8, 8))


def test_inf_in_x_and_context_is_rejected():
    flow = _flow()
    with pytest.raises(ValueError, match=r"Inf.*rows \[0\]"):
        flow.log_prob(torch.tensor([[0.0, float("inf")], [1.0, 1.0]]))
    cflow = _flow(context=3)
    with pytest.raises(ValueError, match="context contains Inf"):
        cflow.log_prob(torch.zeros(5, 2), torch.full((5, 3), float("inf")))
    with pytest.raises(ValueError, match="context contains NaN"):
        cflow.sample(4, torch.tensor([float("nan"), 0.0, 0.0]))


@pytest.mark.parametrize("layer", [
    nf.Permutation([2, 1, 0]),
    nf.Coupling(nf.Affine(), mask="half", features=4),
    nf.MaskedAutoregressive(nf.Affine(), features=3),
    nf.LULinear(3),
    nf.Planar(3),
    nf.CircularShift([nf.real, nf.circle, nf.real]),
])
def test_layers_reject_wrong_width(layer):
    with pytest.raises(ValueError, match="expects .*features"):
        layer(torch.randn(5, 6))
    with pytest.raises(ValueError, match=r"shape \(batch"):
        layer(torch.randn(6))


def test_actnorm_refuses_to_initialise_from_nan_or_empty():
    a = nf.ActNorm(2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        a(torch.tensor([[1.0, float("nan")], [2.0, 3.0]]))
    assert not a._initialized and not bool(a.initialized)
    with pytest.raises(ValueError, match="empty batch"):
        a(torch.zeros(0, 2))


def test_training_helpers_validate_arguments_and_data():
    flow = _flow()
    data = torch.randn(64, 2)
    with pytest.raises(ValueError, match="clip"):
        training.fit_to_data(flow, data, epochs=1, batch_size=8, lr=1e-3, clip=-1, progress=False)
    with pytest.raises(ValueError, match="patience"):
        training.fit_to_data(flow, data, epochs=1, batch_size=8, lr=1e-3, patience=0,
                             progress=False)
    bad = data.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"data contains NaN or Inf \(rows \[3\]"):
        training.fit_to_data(flow, bad, epochs=1, batch_size=8, lr=1e-3, progress=False)
    with pytest.raises(ValueError, match="empty"):
        training.evaluate_nll(flow, torch.zeros(0, 2))


def test_checkpoint_with_bad_weights_is_a_clear_error(tmp_path):
    flow = _flow()
    path = tmp_path / "m.pt"
    save_checkpoint(path, flow)
    payload = torch.load(path, weights_only=False)
    payload["state_dict"] = [1, 2]
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="no weights"):
        load_checkpoint(path)
    save_checkpoint(path, flow)
    payload = torch.load(path, weights_only=False)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = torch.full_like(payload["state_dict"][key], float("nan"))
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="non-finite"):
        load_checkpoint(path)


@pytest.mark.parametrize("kwargs,match", [
    (dict(features=2.7), "features must be an integer"),
    (dict(features=2, layers=1.5), "layers must be an integer"),
    (dict(features=2, hidden="64"), "hidden"),
    (dict(features=2, tail_bound=float("inf")), "tail_bound"),
    (dict(features=2, permutation="shuffle"), "permutation"),
    (dict(features=2, standardize="no"), "standardize"),
])
def test_build_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.build("nsf", **kwargs)


def test_check_transform_names_a_dtype_mismatch():
    with pytest.raises(ValueError, match="float64"):
        check_transform(nf.LULinear(3), torch.randn(4, 3, dtype=torch.float64))


def test_constructor_argument_checks():
    with pytest.raises(ValueError, match="integer"):
        nf.Permutation([0.0, 1.7])
    with pytest.raises(ValueError, match="permutation"):
        nf.LULinear(3, permutation=[0, 0, 1])
    with pytest.raises(ValueError, match="context widths"):
        nf.Product([nf.ConditionalDiagGaussian(1, 2), nf.ConditionalDiagGaussian(1, 3)])
    with pytest.raises(ValueError, match="non-negative"):
        _flow().sample(-1)


def test_distribution_broadcasts_one_event_over_contexts():
    flow = _flow(context=3)
    d = flow.distribution(torch.randn(4, 3))
    lp = d.log_prob(torch.zeros(2))
    assert lp.shape == (4,)
    assert torch.allclose(lp, flow.log_prob(torch.zeros(4, 2), d.context))


def test_plot_samples_handles_one_dimension(tmp_path):
    import numpy as np

    from normflux.plotting import plot_samples
    rng = np.random.default_rng(0)
    out = plot_samples(rng.normal(size=(200, 1)), rng.normal(size=(200, 1)), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000 and str(out).endswith("s.png")
