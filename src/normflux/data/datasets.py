"""Named data sets and user files as train/test splits: ``load_dataset("two-moons")``.

Known names (:data:`DATASETS`):

* ``"two-moons"``: ``sklearn.datasets.make_moons(2000, noise=0.05, random_state=seed)``
  for training and 1000 points with ``random_state=seed + 1`` for testing (2-D, real).
* ``"digits"``: scikit-learn's 8x8 digits, split by
  :func:`normflux.data.digits.load_digits_split` (1500 / 297, integers 0..16),
  dequantised as ``(x + u) / 17`` (:func:`normflux.data.digits.dequantize`), scored in
  bits per dimension (:func:`normflux.data.digits.bits_per_dim`).

Anything else is a path to a ``.csv`` or ``.npy`` file (:func:`~.tables.load_table`), of
which a random 10 % (``numpy.random.default_rng(0)``) is held out as the test set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor

from .tables import DataError, load_table

__all__ = ["Dataset", "DATASETS", "load_dataset", "two_moons"]

DATASETS = ("digits", "two-moons")


@dataclass
class Dataset:
    """A train/test split.

    Attributes:
        name: the data set's name or the file path.
        train, test: ``(N, D)`` float32 tensors (for digits: the integer pixel values,
            dequantise them with :attr:`dequantize`).
        train_context, test_context: ``(N, C)`` float32 contexts, or ``None``.
        dequantize: ``dequantize(x, generator) -> x'`` for integer data, else ``None``.
        bits_per_dim: ``bits_per_dim(nll) -> float`` where the data set defines it.
        context_columns: the context columns taken from a file (as given), or ``None``.
    """

    name: str
    train: Tensor
    test: Tensor
    train_context: Tensor | None = None
    test_context: Tensor | None = None
    dequantize: Callable[[Tensor, torch.Generator], Tensor] | None = None
    bits_per_dim: Callable[[float], float] | None = None
    context_columns: list | None = None

    @property
    def features(self) -> int:
        """``D``, the number of data columns."""
        return self.train.shape[1]

    @property
    def context_features(self) -> int | None:
        """``C``, the number of context columns, or ``None``."""
        return None if self.train_context is None else self.train_context.shape[1]

    def split(self, which: str = "test", seed: int = 0) -> tuple[Tensor, Tensor | None]:
        """``(x, context)`` of ``"train"``, ``"test"`` or ``"all"`` (train then test), ready
        for ``log_prob``: dequantised with fixed noise (``seed``) where the data set needs it.

        Returns:
            ``x``: ``(N, D)`` float32; ``context``: ``(N, C)`` float32 or ``None``.

        Raises:
            ValueError: an unknown split.
        """
        if which == "train":
            x, c = self.train, self.train_context
        elif which == "test":
            x, c = self.test, self.test_context
        elif which == "all":
            x = torch.cat([self.train, self.test])
            c = None if self.train_context is None else torch.cat([self.train_context,
                                                                  self.test_context])
        else:
            raise ValueError(f"unknown split {which!r}: use 'train', 'test' or 'all'")
        if self.dequantize is not None:
            x = self.dequantize(x, torch.Generator().manual_seed(int(seed)))
        return x, c


def two_moons(n: int = 2000, seed: int = 0, noise: float = 0.05) -> Tensor:
    """``n`` points of ``sklearn.datasets.make_moons(n, noise=noise, random_state=seed)``.

    Two interleaved half circles with Gaussian noise of std ``noise`` (scikit-learn's
    toy data set; no paper defines it).

    Returns:
        ``(n, 2)`` float32 tensor.

    Raises:
        ImportError: scikit-learn is not installed.
    """
    from sklearn.datasets import make_moons

    x, _ = make_moons(n, noise=noise, random_state=seed)
    return torch.as_tensor(x, dtype=torch.float32)


def load_dataset(name: str | os.PathLike, *, seed: int = 0,
                 context_columns: Sequence[int | str] | None = None,
                 test_fraction: float = 0.1) -> Dataset:
    """A named data set (:data:`DATASETS`) or a ``.csv``/``.npy`` file as a :class:`Dataset`.

    Arguments:
        name: ``"two-moons"``, ``"digits"`` or a file path.
        seed: the data set's seed (two-moons generation, digits split); files are split
            with ``numpy.random.default_rng(seed)``.
        context_columns: for files, the columns to use as context (see
            :func:`~.tables.load_table`); not allowed for the named data sets.
        test_fraction: for files, the fraction held out as the test set (>= 1 row).

    Returns:
        a :class:`Dataset` (float32 tensors; for files, ``max(1, round(test_fraction *
        N))`` random rows are the test set).

    Raises:
        DataError (a ``ValueError``): not a known name and not an existing file, a
            malformed file, context columns for a named data set, or too few rows.
        ImportError: scikit-learn is not installed (named data sets).
    """
    key = str(name)
    if key in DATASETS:
        if context_columns:
            raise DataError(f"data set {key!r} has no context columns")
        if key == "two-moons":
            return Dataset(key, two_moons(2000, seed), two_moons(1000, seed + 1))
        from . import digits
        train, test = digits.load_digits_split(seed)
        return Dataset(key, torch.as_tensor(train, dtype=torch.float32),
                       torch.as_tensor(test, dtype=torch.float32),
                       dequantize=digits.dequantize, bits_per_dim=digits.bits_per_dim)
    path = os.fspath(name)
    if not os.path.exists(path) and not path.lower().endswith((".csv", ".npy")):
        raise DataError(f"unknown data {key!r}: not a data set ({', '.join(DATASETS)}) and "
                        "not an existing .csv/.npy file")
    x, c = load_table(path, context_columns)
    N = x.shape[0]
    n_test = max(1, int(round(test_fraction * N)))
    if N < 2:
        raise DataError(f"{path}: {N} row is too few (need at least 2: a {test_fraction:.0%} "
                        "test split is held out)")
    perm = np.random.default_rng(seed).permutation(N)
    te, tr = perm[:n_test], perm[n_test:]
    f32 = lambda a: torch.as_tensor(a, dtype=torch.float32)  # noqa: E731
    return Dataset(path, f32(x[tr]), f32(x[te]),
                   None if c is None else f32(c[tr]), None if c is None else f32(c[te]),
                   context_columns=list(context_columns) if context_columns else None)
