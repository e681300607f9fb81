"""Which values of a call the drift engine watches, and how they are read out of KServe V2 messages.

A *series* is one column of one tensor: an input feature (``input[i]``, or a configured name) or an output
(``probabilities[2]``, ``label``). BYTES tensors, and integer or boolean outputs (class labels), are categorical;
everything else numeric, unless the configuration says a feature is categorical. Unless features are configured,
every column of every input is watched; unless outputs are, every column of every output.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from mlmirror.config import Drift
from mlmirror.protocol.kserve import Tensor, TensorError

__all__ = ["Rows", "Schema", "Series", "as_category", "discover"]

#: A call may carry at most this many rows into the drift engine (more are counted as ``too_many_rows``).
MAX_ROWS_PER_CALL = 65536
#: A tensor may contribute at most this many series.
MAX_COLUMNS = 4096


@dataclass(frozen=True, slots=True)
class Series:
    """One watched column: ``kind`` is ``feature`` or ``output``; ``column`` None: the tensor's only column.
    ``width``: the columns the tensor must have (None: any that holds ``column``). ``tensor`` None (a feature of a
    profile built without ``--input``): the model's only input, whatever its name, once bound (``Schema.bind``)."""

    name: str
    kind: str
    tensor: str | None
    column: int | None
    categorical: bool
    width: int | None = None


@dataclass(frozen=True, slots=True)
class Rows:
    """One call's values: numeric [rows, numeric series] float64, categorical [rows, categorical series] object."""

    numeric: np.ndarray
    categorical: np.ndarray


class Schema:
    """The series of a route, in a fixed order: numeric ones, then categorical ones."""

    def __init__(self, series: list[Series]) -> None:
        self.series = tuple(series)
        self.numeric = tuple(s for s in self.series if not s.categorical)
        self.categorical = tuple(s for s in self.series if s.categorical)
        #: (kind, tensor) -> its series as (position among the numeric or categorical ones, series), in the order
        #: the series first name the tensor: one reshape per tensor and call, however many columns it gives
        self._reads: dict[tuple[str, str | None], list[tuple[int, Series]]] = {}
        for position, s in (*enumerate(self.numeric), *enumerate(self.categorical)):
            self._reads.setdefault((s.kind, s.tensor), []).append((position, s))
        #: (kind, tensor) -> the first numeric position, for a tensor whose series are all its columns, in order, at
        #: consecutive numeric positions: its table is copied in one block
        self._blocks = {key: reads[0][0] for key, reads in self._reads.items() if _is_block(reads)}

    def names(self) -> list[str]:
        return [s.name for s in (*self.numeric, *self.categorical)]

    @property
    def unbound(self) -> bool:
        """Whether some feature names no input tensor yet (see ``bind``)."""
        return any(s.tensor is None for s in self.series)

    def bind(self, tensor: str) -> Schema:
        """This schema with every series that names no tensor reading input ``tensor``."""
        return Schema([replace(s, tensor=tensor) if s.tensor is None else s for s in self.series])

    def rows(self, inputs: list[Tensor], outputs: list[Tensor]) -> Rows:
        """The values of every series in one call; raises ``TensorError`` (with a reason) when they are not there."""
        tensors: dict[tuple[str, str | None], Tensor] = {("feature", t.name): t for t in inputs}
        tensors |= {("output", t.name): t for t in outputs}  # an unbound series (tensor None) finds none
        n: int | None = None
        columns: list[tuple[int, Series, np.ndarray]] = []
        blocks: list[tuple[int, np.ndarray]] = []
        for key, reads in self._reads.items():
            tensor = tensors.get(key)
            if tensor is None:
                raise TensorError("missing_tensor", f"no {key[0]} tensor {key[1]!r}")
            table = _table(tensor)
            start = self._blocks.get(key)
            if start is not None:
                blocks.append((start, _block(table, reads[0][1])))
            else:
                columns += [(position, series, _column(table, series)) for position, series in reads]
            if n is None:
                n = table.shape[0]
                if n > MAX_ROWS_PER_CALL:
                    raise TensorError("too_many_rows", f"{n} rows (at most {MAX_ROWS_PER_CALL})")
            elif table.shape[0] != n:
                raise TensorError("row_mismatch", f"{reads[0][1].name}: {table.shape[0]} rows, others {n}")
        n = n or 0
        numeric = np.empty((n, len(self.numeric)))
        categorical = np.empty((n, len(self.categorical)), dtype=object)
        for start, table in blocks:
            numeric[:, start : start + table.shape[1]] = table
        for position, series, column in columns:
            if series.categorical:
                # Categories are compared as bytes, whatever the tensor's datatype (labels may be integers).
                categorical[:, position] = [as_category(v) for v in column.tolist()]
            else:
                numeric[:, position] = column
        return Rows(numeric=numeric, categorical=categorical)


def as_category(value: object) -> bytes:
    """A category as drift compares it: the bytes a KServe BYTES tensor carries; anything else (an integer label,
    a CSV cell) as its text in UTF-8. Profiles and live calls both go through here, so their vocabularies agree."""
    return value if isinstance(value, bytes) else str(value).encode()


def _table(tensor: Tensor) -> np.ndarray:
    """The tensor's values as [rows, columns] (a scalar is one row, a vector one column)."""
    values = tensor.values
    if values.ndim == 0:
        values = values.reshape(1)
    return values.reshape(values.shape[0], math.prod(values.shape[1:]))


def _is_block(reads: list[tuple[int, Series]]) -> bool:
    """Whether ``reads`` (one tensor's series) are numeric columns 0..width-1 of a tensor of that width, at
    consecutive positions."""
    first, series = reads[0]
    return series.width == len(reads) > 1 and all(
        not s.categorical and s.column == i and s.width == series.width and position == first + i
        for i, (position, s) in enumerate(reads)
    )


def _block(table: np.ndarray, series: Series) -> np.ndarray:
    """All of ``table`` for a tensor read as one block (``_is_block``); the checks of ``_column``, once."""
    if table.shape[1] != series.width:
        raise TensorError("shape_mismatch", f"{series.tensor}: {table.shape[1]} columns, expected {series.width}")
    if table.dtype == object:
        raise TensorError("dtype_mismatch", f"{series.name}: BYTES values for a numeric series")
    return table


def _column(table: np.ndarray, series: Series) -> np.ndarray:
    """The series' column of its tensor's ``table``; raises ``TensorError`` when the tensor does not have it."""
    if series.width is not None and table.shape[1] != series.width:
        raise TensorError("shape_mismatch", f"{series.tensor}: {table.shape[1]} columns, expected {series.width}")
    if series.column is None:
        if table.shape[1] != 1:
            raise TensorError("shape_mismatch", f"{series.name}: tensor has {table.shape[1]} columns, expected 1")
        column = table[:, 0]
    elif series.column >= table.shape[1]:
        raise TensorError("shape_mismatch", f"{series.name}: no column {series.column} in {table.shape[1]}")
    else:
        column = table[:, series.column]
    if not series.categorical and column.dtype == object:
        raise TensorError("dtype_mismatch", f"{series.name}: BYTES values for a numeric series")
    return column


def discover(spec: Drift, inputs: list[Tensor], outputs: list[Tensor]) -> Schema:
    """The schema for ``spec``, completed from one call's tensors where the configuration leaves it open."""
    series: list[Series] = []
    if spec.features:
        series += [
            Series(f.name, "feature", f.input, f.column, f.categorical or _is_bytes(inputs, f.input))
            for f in spec.features
        ]
    else:
        for tensor in inputs:
            series += _all_columns(tensor, "feature", categorical=tensor.datatype == "BYTES")
    wanted = set(spec.outputs)
    for tensor in outputs:
        if wanted and tensor.name not in wanted:
            continue
        label_like = tensor.datatype == "BYTES" or tensor.values.dtype.kind in "iub"
        series += _all_columns(tensor, "output", categorical=label_like)
    missing = wanted - {t.name for t in outputs}
    if missing:
        raise TensorError("missing_tensor", f"configured outputs not in the response: {sorted(missing)}")
    if not series:
        raise TensorError("no_series", "the call has no tensor to watch")
    return Schema(series)


def _is_bytes(tensors: list[Tensor], name: str) -> bool:
    return any(t.name == name and t.datatype == "BYTES" for t in tensors)


def _all_columns(tensor: Tensor, kind: str, *, categorical: bool) -> list[Series]:
    shape = tensor.values.shape
    columns = int(np.prod(shape[1:])) if len(shape) >= 2 else 1
    if columns > MAX_COLUMNS:
        raise TensorError("too_many_columns", f"{tensor.name}: {columns} columns (at most {MAX_COLUMNS})")
    if columns == 1:
        return [Series(tensor.name, kind, tensor.name, None, categorical, 1)]
    return [Series(f"{tensor.name}[{i}]", kind, tensor.name, i, categorical, columns) for i in range(columns)]
