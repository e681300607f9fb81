"""``mlmirror profile build``: a reference profile from a data file, for routes that should not capture their own.

- ``.npy``: a [rows, columns] (or [rows]) numeric array: columns of input tensor ``--input``, named ``NAME[i]``
  (or ``NAME`` for one column), or by ``--names``. Without ``--input`` the profile names no tensor: its columns are
  the model's only input, whatever the model calls it (bound at start-up, see ``binding``), named ``input[i]``.
- ``.csv``: a header row, then rows; each column is a column of the input tensor (``--input``, or the model's only
  input), named by its header; a column whose values are not all numbers is categorical.
- ``.npz``: one array per input tensor, keyed by the tensor's name ([rows] or [rows, columns]); string arrays are
  categorical.
- ``.parquet`` (when pyarrow is installed): like CSV, one column per feature.
- a capture (``routes[].capture``): a ``.jsonl`` file or a directory of them: the decoded input tensors of every
  captured ModelInfer call, stacked, named as the proxy names them (``tensor[i]``, or ``tensor`` for one column);
  BYTES inputs are categorical, redacted inputs absent. ``--names`` renames the columns as for ``.npz``.

Series names must match what the route watches (its ``drift.features`` names, or ``tensor[i]`` by default); the
proxy checks at start-up and says what differs.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from mlmirror.observing.capture.record import captured_inputs
from mlmirror.observing.drift.binding import LEGACY_INPUT
from mlmirror.observing.drift.reference import Reference
from mlmirror.observing.drift.schema import Rows, Schema, Series, as_category

__all__ = ["build_profile", "read_table"]


def read_table(path: Path, input_name: str | None = None, names: list[str] | None = None) -> tuple[Schema, Rows]:
    """The series and rows a data file holds (see the module docstring); ``input_name`` None: the model's only
    input."""
    suffix = path.suffix.lower()
    if path.is_dir() or suffix == ".jsonl":
        return _columns(captured_inputs(path), names)
    if suffix == ".npy":
        array = np.load(path, allow_pickle=False)
        return _columns([(input_name, array)], names)
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return _columns([(key, data[key]) for key in data.files], names)
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.reader(file)
            header = next(reader, None)
            if header is None:
                raise ValueError(f"{path}: empty CSV file")
            body = list(reader)
        columns = list(zip(*body, strict=True)) if body else [() for _ in header]
        return _named_columns(input_name, header, [list(c) for c in columns])
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(f"{path}: reading Parquet needs pyarrow (pip install pyarrow)") from None
        table = pq.read_table(path)
        return _named_columns(input_name, table.column_names, [table.column(n).to_pylist() for n in table.column_names])
    raise ValueError(
        f"{path}: unknown data format {suffix!r} (.npy, .npz, .csv, .parquet, .jsonl or a capture directory)"
    )


def _columns(tensors: Sequence[tuple[str | None, np.ndarray]], names: list[str] | None) -> tuple[Schema, Rows]:
    series: list[Series] = []
    numeric: list[np.ndarray] = []
    categorical: list[np.ndarray] = []
    for tensor, array in tensors:
        table = array.reshape(array.shape[0], -1) if array.ndim >= 1 else array.reshape(1, 1)
        is_text = table.dtype.kind in "USO"
        for i in range(table.shape[1]):
            shown = tensor if tensor is not None else LEGACY_INPUT  # an unnamed input's columns: input[i]
            name = shown if table.shape[1] == 1 else f"{shown}[{i}]"
            series.append(Series(name, "feature", tensor, None if table.shape[1] == 1 else i, is_text))
            column = table[:, i]
            if is_text:
                categorical.append(np.array([as_category(v) for v in column], dtype=object))
            else:
                numeric.append(column.astype(np.float64))
    if names is not None:
        if len(names) != len(series):
            raise ValueError(f"--names gives {len(names)} names for {len(series)} columns")
        series = [Series(n, s.kind, s.tensor, s.column, s.categorical) for n, s in zip(names, series, strict=True)]
    return _schema_rows(series, numeric, categorical)


def _named_columns(tensor: str | None, header: list[str], columns: list[list]) -> tuple[Schema, Rows]:
    series, numeric, categorical = [], [], []
    for i, (name, values) in enumerate(zip(header, columns, strict=True)):
        try:
            numbers = np.array([float(v) if v not in ("", None) else np.nan for v in values], dtype=np.float64)
        except (TypeError, ValueError):
            numbers = None
        column = i if len(header) > 1 else None
        if numbers is not None:
            series.append(Series(name, "feature", tensor, column, False))
            numeric.append(numbers)
        else:
            series.append(Series(name, "feature", tensor, column, True))
            categorical.append(np.array([as_category(v) for v in values], dtype=object))
    return _schema_rows(series, numeric, categorical)


def _schema_rows(series: list[Series], numeric: list[np.ndarray], categorical: list[np.ndarray]) -> tuple[Schema, Rows]:
    schema = Schema(series)
    rows = len(numeric[0]) if numeric else len(categorical[0]) if categorical else 0
    return schema, Rows(
        np.stack(numeric, axis=1) if numeric else np.empty((rows, 0)),
        np.stack(categorical, axis=1) if categorical else np.empty((rows, 0), dtype=object),
    )


def build_profile(
    data: Path,
    out: Path,
    *,
    bins: int,
    model: str,
    version: str,
    input_name: str | None = None,
    names: list[str] | None = None,
) -> Reference:
    """Read ``data``, build its reference profile and write it to ``out`` (``input_name`` None: the columns of
    a .npy, .csv or .parquet file are the model's only input)."""
    schema, rows = read_table(data, input_name, names)
    if rows.numeric.shape[0] == 0:
        raise ValueError(f"{data}: no rows")
    reference = Reference.build(schema, rows, bins, calls=rows.numeric.shape[0], model=model, version=version)
    reference.save(out)
    return reference
