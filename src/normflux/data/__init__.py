"""Data sets shipped or loaded offline, dequantization and preprocessing.

* :func:`load_table`: a numeric ``.csv``/``.npy`` file, with errors naming row and column;
* :func:`load_dataset`: ``"two-moons"``, ``"digits"`` or a file as a train/test
  :class:`Dataset`;
* :mod:`normflux.data.digits`: scikit-learn's 8x8 digits benchmark (split,
  dequantisation, bits per dimension).
"""
from . import digits
from .datasets import DATASETS, Dataset, load_dataset, two_moons
from .tables import DataError, load_table

__all__ = ["digits", "DataError", "load_table", "Dataset", "DATASETS", "load_dataset",
           "two_moons"]
