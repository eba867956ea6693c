"""Loading numeric tables (``.csv``, ``.npy``) with errors a user can act on.

Every problem is a :class:`DataError` (a ``ValueError``) whose message names the file
and, for cell-level problems, the row and column numbered from 1 as in a spreadsheet
(the header, when there is one, is row 1).
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["DataError", "load_table", "column_letter"]


class DataError(ValueError):
    """A data file is missing, unreadable or malformed (the message says where and why)."""


def column_letter(j: int) -> str:
    """Spreadsheet name of the 1-based column ``j``: 1 -> A, 27 -> AA (``""`` if ``j < 1``)."""
    s = ""
    while j > 0:
        j, r = divmod(j - 1, 26)
        s = chr(65 + r) + s
    return s


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _where(path: Path, row: int, col: int, header: list[str] | None) -> str:
    name = f", {header[col - 1]!r}" if header and col - 1 < len(header) else ""
    return f"{path}: row {row}, column {col} ({column_letter(col)}{name})"


def _read_csv(path: Path) -> tuple[np.ndarray, list[str] | None]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(reader_line, row) for reader_line, row in _rows(f)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text CSV file ({e.reason} at byte {e.start})") from e
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV ({e})") from e
    if not rows:
        raise DataError(f"{path}: the file is empty (no rows)")
    header = None
    first_line, first = rows[0]
    if first and all(not _is_number(c.strip()) and c.strip() != "" for c in first) and \
            not any(c.strip().lower() in ("nan", "inf", "-inf", "+inf") for c in first):
        header = [c.strip() for c in first]
        rows = rows[1:]
        if not rows:
            raise DataError(f"{path}: the file has a header ({', '.join(header)}) but no data rows")
    width = len(header) if header else len(rows[0][1])
    out = np.empty((len(rows), width), dtype=np.float64)
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            plural = "" if len(row) == 1 else "s"
            raise DataError(f"{path}: row {line} has {len(row)} column{plural}, expected {width} "
                            f"(as in {'the header' if header else f'row {rows[0][0]}'})")
        for j, cell in enumerate(row):
            text = cell.strip()
            if text == "":
                raise DataError(f"{_where(path, line, j + 1, header)}: empty cell (missing value)")
            try:
                v = float(text)
            except ValueError:
                raise DataError(f"{_where(path, line, j + 1, header)}: {cell!r} is not a number"
                                ) from None
            if not math.isfinite(v):
                raise DataError(f"{_where(path, line, j + 1, header)}: {cell!r} is not a finite "
                                "number (NaN/Inf are not allowed)")
            out[i, j] = v
    return out, header


def _rows(f):
    """``(line number, cells)`` for every non-blank CSV row (line numbers 1-based)."""
    reader = csv.reader(f)
    start = 1
    for row in reader:
        line = start
        start = reader.line_num + 1
        if not row or all(c.strip() == "" for c in row):
            continue
        yield line, row


def _read_npy(path: Path) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise DataError(f"{path}: not a numeric .npy array ({e})") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy file ({e})") from e
    if isinstance(arr, np.lib.npyio.NpzFile):  # pragma: no cover - .npz renamed to .npy
        arr.close()
        raise DataError(f"{path}: is an .npz archive, expected a single .npy array")
    if arr.dtype.kind not in "biuf":
        raise DataError(f"{path}: the array has dtype {arr.dtype}, expected numbers")
    if arr.ndim != 2:
        raise DataError(f"{path}: expected a 2-D array (rows x columns), got {arr.ndim}-D with "
                        f"shape {arr.shape}" + ("; reshape it to (N, 1) or (N, D)"
                                                if arr.ndim in (1, 3) else ""))
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise DataError(f"{path}: the array is empty (shape {arr.shape})")
    arr = arr.astype(np.float64)
    bad = ~np.isfinite(arr)
    if bad.any():
        i, j = map(int, np.argwhere(bad)[0])
        raise DataError(f"{path}: row {i + 1}, column {j + 1} ({column_letter(j + 1)}) is "
                        f"{arr[i, j]} (NaN/Inf are not allowed; {int(bad.sum())} such cells)")
    return arr


def _select(path: Path, arr: np.ndarray, header: list[str] | None,
            context_columns: Sequence[int | str] | None) -> tuple[np.ndarray, np.ndarray | None]:
    if not context_columns:
        return arr, None
    D = arr.shape[1]
    idx: list[int] = []
    for c in context_columns:
        if isinstance(c, str) and not c.lstrip("-").isdigit():
            if header is None:
                raise DataError(f"{path}: context column {c!r} is a name but the file has no "
                                "header; give 0-based column indices instead")
            if c not in header:
                raise DataError(f"{path}: no column named {c!r} (columns: {', '.join(header)})")
            if header.count(c) > 1:
                raise DataError(f"{path}: {header.count(c)} columns are named {c!r}; give "
                                "0-based column indices instead")
            j = header.index(c)
        else:
            j = int(c)
            if not -D <= j < D:
                raise DataError(f"{path}: context column index {j} is out of range for "
                                f"{D} columns (0-based indices 0..{D - 1})")
            j %= D
        if j in idx:
            raise DataError(f"{path}: context column {c!r} is given twice")
        idx.append(j)
    rest = [j for j in range(D) if j not in idx]
    if not rest:
        raise DataError(f"{path}: every column is a context column; no data columns are left")
    return arr[:, rest], arr[:, idx]


def load_table(path: str | os.PathLike, context_columns: Sequence[int | str] | None = None
               ) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a numeric table from ``.csv`` or ``.npy`` and split off context columns.

    CSV: comma-separated, one row per line, an optional header (the first row is a
    header when none of its cells is a number); blank lines are skipped. Every other cell
    must be a finite number. NPY: a 2-D numeric array (``numpy.save``; no pickles).

    Arguments:
        path: the file; the extension (``.csv`` or ``.npy``, any case) picks the format.
        context_columns: columns to return as the context (conditioning variables):
            0-based indices (negative counts from the end; strings of digits such as
            ``"2"`` or ``"-1"`` count as indices) or header names; ``None`` or empty for
            none.

    Returns:
        ``(data, context)``: ``float64`` arrays of shape ``(N, D)`` and ``(N, C)`` (or
        ``None``), with the remaining columns in file order as ``data``.

    Raises:
        DataError (a ``ValueError``): the file does not exist, is a directory, has
            another extension, is empty, has a non-numeric / empty / NaN / Inf cell (row
            and column named, 1-based), a value beyond the float32 range, rows of unequal
            length, is not 2-D, or a context column does not exist, is named in a file
            without a header or by a name several columns share, is given twice, or
            leaves no data column.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: file does not exist")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a .csv or .npy file")
    ext = path.suffix.lower()
    if ext == ".csv":
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        arr, header = _read_csv(path)
    elif ext == ".npy":
        if path.stat().st_size == 0:
            raise DataError(f"{path}: the file is empty")
        arr, header = _read_npy(path), None
    else:
        raise DataError(f"{path}: unsupported file type {ext or '(no extension)'!r}; "
                        "use .csv or .npy")
    big = np.abs(arr) > np.finfo(np.float32).max
    if big.any():  # models train in float32: such a cell would become Inf there
        i, j = map(int, np.argwhere(big)[0])
        name = f", {header[j]!r}" if header else ""
        raise DataError(f"{path}: data row {i + 1}, column {j + 1} ({column_letter(j + 1)}"
                        f"{name}) is {arr[i, j]:g}, beyond the float32 "
                        f"range (+-{np.finfo(np.float32).max:.3g}) the models train in "
                        f"({int(big.sum())} such cells); rescale the data")
    return _select(path, arr, header, context_columns)
