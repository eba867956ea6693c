"""Tests of normflux.data: load_table errors (row/column named), named data sets, file splits."""

import numpy as np
import pytest
import torch

from normflux.data import DataError, load_dataset, load_table
from normflux.data.tables import column_letter


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_csv_with_and_without_header(tmp_path):
    a = _write(tmp_path, "a.csv", "x,y,z\n1,2,3\n4.5,-5e-1,6\n")
    data, ctx = load_table(a)
    np.testing.assert_array_equal(data, [[1, 2, 3], [4.5, -0.5, 6]])
    assert ctx is None and data.dtype == np.float64
    b = _write(tmp_path, "b.csv", "1,2\n3,4\n\n5,6\n")          # blank lines are skipped
    data, _ = load_table(b)
    np.testing.assert_array_equal(data, [[1, 2], [3, 4], [5, 6]])


def test_context_columns_by_name_and_index(tmp_path):
    p = _write(tmp_path, "c.csv", "a,b,c\n1,2,3\n4,5,6\n")
    data, ctx = load_table(p, ["b"])
    np.testing.assert_array_equal(data, [[1, 3], [4, 6]])
    np.testing.assert_array_equal(ctx, [[2], [5]])
    data, ctx = load_table(p, [-1, "0"])                        # 0-based, negatives allowed
    np.testing.assert_array_equal(data, [[2], [5]])
    np.testing.assert_array_equal(ctx, [[3, 1], [6, 4]])
    with pytest.raises(DataError, match="no column named 'q'"):
        load_table(p, ["q"])
    with pytest.raises(DataError, match="out of range"):
        load_table(p, [3])
    with pytest.raises(DataError, match="no data columns"):
        load_table(p, [0, 1, 2])


@pytest.mark.parametrize("text, pattern", [
    ("x,y\n1,2\n3,abc\n", r"row 3, column 2 \(B, 'y'\): 'abc' is not a number"),
    ("1,2\n3,4\n5,oops\n", r"row 3, column 2 \(B\): 'oops' is not a number"),
    ("1,2,3\n4,5,nan\n", r"row 2, column 3 \(C\).*NaN"),
    ("a,b\n1,NaN\n", r"row 2, column 2 \(B, 'b'\).*not a finite number"),
    ("1,2\n3,inf\n", r"row 2, column 2.*not a finite"),
    ("1,2\n,4\n", r"row 2, column 1 \(A\): empty cell"),
    ("1,2\n3\n", r"row 2 has 1 column, expected 2"),
    ("x,y\n", r"has a header \(x, y\) but no data rows"),
    ("\n\n", r"empty"),
])
def test_csv_errors_name_the_problem(tmp_path, text, pattern):
    p = _write(tmp_path, "bad.csv", text)
    with pytest.raises(DataError, match=pattern) as e:
        load_table(p)
    assert "bad.csv" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_empty_missing_and_unsupported_files(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        load_table(_write(tmp_path, "e.csv", ""))
    with pytest.raises(ValueError, match="does not exist"):
        load_table(tmp_path / "nope.csv")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_table(_write(tmp_path, "t.txt", "1,2\n"))
    with pytest.raises(ValueError, match="directory"):
        load_table(tmp_path)


def test_npy_loading_and_errors(tmp_path):
    good = np.arange(6.0).reshape(3, 2)
    np.save(tmp_path / "g.npy", good)
    data, _ = load_table(tmp_path / "g.npy")
    np.testing.assert_array_equal(data, good)
    np.save(tmp_path / "one.npy", np.zeros(4))
    with pytest.raises(ValueError, match="expected a 2-D array.*1-D"):
        load_table(tmp_path / "one.npy")
    np.save(tmp_path / "three.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D.*3-D"):
        load_table(tmp_path / "three.npy")
    bad = good.copy()
    bad[2, 1] = np.nan
    np.save(tmp_path / "nan.npy", bad)
    with pytest.raises(ValueError, match=r"row 3, column 2 \(B\) is nan"):
        load_table(tmp_path / "nan.npy")
    np.save(tmp_path / "s.npy", np.array([["a", "b"]]))
    with pytest.raises(ValueError, match="dtype"):
        load_table(tmp_path / "s.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(ValueError, match="junk.npy"):
        load_table(tmp_path / "junk.npy")


def test_column_letters():
    assert [column_letter(j) for j in (1, 2, 26, 27, 28, 52, 53)] == \
        ["A", "B", "Z", "AA", "AB", "AZ", "BA"]


def test_two_moons_dataset():
    from sklearn.datasets import make_moons
    ds = load_dataset("two-moons")
    assert ds.train.shape == (2000, 2) and ds.test.shape == (1000, 2)
    ref, _ = make_moons(2000, noise=0.05, random_state=0)
    np.testing.assert_allclose(ds.train.numpy(), ref, rtol=1e-6, atol=1e-6)
    assert ds.dequantize is None and ds.bits_per_dim is None and ds.context_features is None
    with pytest.raises(ValueError, match="no context columns"):
        load_dataset("two-moons", context_columns=[0])


def test_digits_dataset_dequantised_split_is_fixed():
    ds = load_dataset("digits")
    assert ds.train.shape == (1500, 64) and ds.test.shape == (297, 64)
    assert torch.equal(ds.train, ds.train.round()) and float(ds.train.max()) == 16
    x1, c = ds.split("test")
    x2, _ = ds.split("test")
    assert c is None and torch.equal(x1, x2)                  # fixed noise per seed
    assert float(x1.min()) >= 0 and float(x1.max()) <= 1
    assert not torch.equal(x1, ds.split("test", seed=1)[0])
    torch.testing.assert_close(torch.floor(x1 * 17), ds.test)
    assert abs(ds.bits_per_dim(0.0) - np.log2(17)) < 1e-12


def test_file_dataset_holds_out_ten_percent(tmp_path):
    rng = np.random.default_rng(5)
    arr = rng.normal(size=(50, 3))
    np.save(tmp_path / "d.npy", arr)
    ds = load_dataset(tmp_path / "d.npy", context_columns=[2])
    assert ds.train.shape == (45, 2) and ds.test.shape == (5, 2)
    assert ds.train_context.shape == (45, 1) and ds.test_context.shape == (5, 1)
    perm = np.random.default_rng(0).permutation(50)
    np.testing.assert_allclose(ds.test.numpy(), arr[perm[:5], :2], rtol=1e-6)
    x, c = ds.split("all")
    assert x.shape == (50, 2) and c.shape == (50, 1)
    with pytest.raises(DataError, match="unknown data 'fancy-set'"):
        load_dataset("fancy-set")
