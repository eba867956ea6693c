"""The scikit-learn 8x8 handwritten digits as a small density-estimation benchmark.

Source: the UCI "Optical Recognition of Handwritten Digits" test set (Alpaydin &
Kaynak, 1998) as bundled with scikit-learn (``sklearn.datasets.load_digits``): 1797
images of 8x8 = 64 pixels, each an integer count in ``0..16`` (so ``LEVELS = 17``
values per pixel). The data ship inside the scikit-learn wheel; nothing is downloaded.

Protocol used by normflux (and by ``benchmarks/digits.py``):

* split: ``numpy.random.default_rng(seed).permutation(1797)``; the first 1500 indices
  are the training set, the remaining 297 the test set;
* dequantisation: ``y = (x + u) / 17`` with ``u ~ U[0, 1)`` i.i.d. per pixel, so
  ``y`` lies in ``[0, 1)`` (``[0, 1]`` after float32 rounding);
* metric: a continuous NLL ``nll`` (nats per example, on the ``y`` scale) is reported
  as bits per dimension ``log2(17) + nll / (64 ln 2)`` (Theis et al. 2016), an upper
  bound on the discrete model's NLL in bits per pixel.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from ..metrics import bits_per_dim as _bits_per_dim

__all__ = ["LEVELS", "DIMS", "N_TOTAL", "N_TRAIN", "N_TEST", "load_digits_split",
           "dequantize", "bits_per_dim", "independent_pixel_baseline"]

#: Number of integer values a pixel can take (0..16).
LEVELS = 17
#: Pixels per image (8 x 8).
DIMS = 64
#: Size of scikit-learn's digits data set and of the fixed split.
N_TOTAL = 1797
N_TRAIN = 1500
N_TEST = N_TOTAL - N_TRAIN  # 297


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Fixed train/test split of scikit-learn's 8x8 digits.

    Args:
        seed: seed of ``numpy.random.default_rng(seed).permutation(1797)``; the first
            1500 permuted rows are the training set, the last 297 the test set. The
            same seed always gives the same split (on any platform: NumPy's
            ``default_rng`` is PCG64, whose stream is stable across versions).

    Returns:
        ``(train, test)``: ``int64`` NumPy arrays of shape ``(1500, 64)`` and
        ``(297, 64)``, values in ``0..16``, pixels in row-major order. Labels are
        discarded (this is an unsupervised density-estimation benchmark).

    Source: Alpaydin & Kaynak 1998, UCI "Optical Recognition of Handwritten Digits"
    (test part, as bundled with scikit-learn).

    Raises:
        ImportError: if scikit-learn is not installed.
        RuntimeError: the bundled data set does not have shape ``(1797, 64)``.
    """
    from sklearn.datasets import load_digits

    x = load_digits().data
    if x.shape != (N_TOTAL, DIMS):  # pragma: no cover - guards a changed sklearn copy
        raise RuntimeError(f"unexpected digits shape {x.shape}, expected {(N_TOTAL, DIMS)}")
    x = np.asarray(x).astype(np.int64)
    perm = np.random.default_rng(seed).permutation(N_TOTAL)
    return x[perm[:N_TRAIN]].copy(), x[perm[N_TRAIN:]].copy()


def dequantize(x_int: np.ndarray | Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation ``(x + u) / 17`` with ``u ~ U[0, 1)`` per entry.

    The dequantisation under which the continuous NLL bounds the discrete one (Theis,
    van den Oord & Bethge 2016, ICLR, section 3.1), rescaled to ``[0, 1)``.

    Args:
        x_int: integer array or tensor of any shape with values in ``0..16``.
        generator: optional ``torch.Generator`` (CPU) for the uniform noise, for
            reproducible draws.

    Returns:
        ``float32`` CPU tensor of the same shape as ``x_int``, values in ``[0, 1]``
        (mathematically ``[0, 1)``; ``(16 + u) / 17`` rounds to exactly ``1.0`` in
        float32 when ``u`` is within about ``2**-20`` of 1).

    Raises:
        ValueError: if ``x_int`` holds non-integer values or values outside ``0..16``.
    """
    x = torch.as_tensor(x_int)
    if x.is_floating_point():
        if not torch.equal(x, torch.round(x)):
            raise ValueError("dequantize expects integer pixel values")
    x = x.to(device="cpu", dtype=torch.float32)
    if x.numel() and (x.min() < 0 or x.max() > LEVELS - 1):
        raise ValueError(f"pixel values must lie in 0..{LEVELS - 1}, "
                         f"got range [{x.min().item():g}, {x.max().item():g}]")
    u = torch.rand(x.shape, generator=generator, dtype=torch.float32)
    return (x + u) / LEVELS


def bits_per_dim(nll_nats_per_example: float | Tensor, dims: int = DIMS) -> float | Tensor:
    """Bits per dimension ``log2(17) + nll / (dims ln 2)`` for the ``(x + u) / 17`` scale.

    Args:
        nll_nats_per_example: continuous negative log-likelihood of the dequantised,
            rescaled data ``(x + u) / 17``, in nats per example (a float or tensor).
        dims: dimensions per example (64 for the 8x8 digits).

    Returns:
        Bits per dimension, same type as the input. Thin wrapper over
        :func:`normflux.metrics.bits_per_dim` with ``levels=17`` (Theis et al. 2016,
        section 3.1).
    """
    return _bits_per_dim(nll_nats_per_example, dims, levels=LEVELS)


def independent_pixel_baseline(seed: int = 0, alpha: float = 1.0) -> float:
    """Test bits/dim of the independent-pixel ("histogram") model: about 2.42.

    The model is a product of 64 independent categorical distributions, one per pixel,
    over the 17 levels, fit on the training split by counting with add-``alpha``
    (Laplace) smoothing: ``p_j(k) = (n_jk + alpha) / (1500 + 17 alpha)``. It is
    evaluated as the mean of ``-log2 p_j(x_ij)`` over the 297 x 64 test pixels.

    With ``seed=0`` and ``alpha=1`` this gives 2.4208 bits/dim, the "2.42" quoted
    for this benchmark (``alpha=0.5`` gives 2.4194; ``alpha=0`` gives infinity, as some
    test pixels take values never seen in training; the training-set bits/dim with
    ``alpha=1`` is 2.4162). Because the histogram is piecewise constant on each
    ``[k/17, (k+1)/17)`` cell, this is also exactly the continuous NLL of the
    equivalent dequantised density, so it is directly comparable with a flow's
    ``bits_per_dim(test_nll)``.

    Args:
        seed: split seed, as in :func:`load_digits_split`.
        alpha: additive smoothing count (must be ``> 0`` for a finite value).

    Returns:
        Test bits per dimension (a Python float; ``inf`` when ``alpha = 0`` and a test
        value never occurs in training).

    Raises:
        ImportError: if scikit-learn is not installed.
    """
    train, test = load_digits_split(seed)
    counts = np.stack([np.bincount(train[:, j], minlength=LEVELS) for j in range(DIMS)])
    counts = counts.astype(np.float64) + alpha
    probs = counts / counts.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        logp = np.log(probs[np.arange(DIMS), test])  # (297, 64)
    return float(-logp.mean() / math.log(2))
