"""How the drift engine reads a call's series out of its tensors (``Schema.rows``) and counts empty categories
(``blanks``), against a naive reading column by column."""

from __future__ import annotations

import numpy as np
import pytest
from mlmirror.config import Drift, DriftFeature
from mlmirror.observing.drift.data_quality import blanks
from mlmirror.observing.drift.schema import Schema, Series, as_category, discover
from mlmirror.protocol.kserve import Tensor, TensorError


def tensor(name: str, datatype: str, values: np.ndarray) -> Tensor:
    return Tensor(name, datatype, values.shape, values)


def call(rng: np.random.Generator, rows: int = 6) -> tuple[list[Tensor], list[Tensor]]:
    """Inputs (FP32 [rows, 4], INT32 [rows, 2], BYTES [rows] with empty values) and outputs (FP32 [rows, 3] and
    INT64 [rows])."""
    codes = np.empty(rows, dtype=object)
    codes[:] = [rng.choice([b"", b"a", b"bb"]) for _ in range(rows)]
    inputs = [tensor("features", "FP32", rng.normal(size=(rows, 4)).astype(np.float32)),
              tensor("counts", "INT32", rng.integers(0, 9, size=(rows, 2)).astype(np.int32)),
              tensor("codes", "BYTES", codes)]  # fmt: skip
    outputs = [tensor("probabilities", "FP32", rng.random((rows, 3)).astype(np.float32)),
               tensor("label", "INT64", rng.integers(0, 3, rows))]  # fmt: skip
    return inputs, outputs


def naive(schema: Schema, inputs: list[Tensor], outputs: list[Tensor]) -> tuple[np.ndarray, list[list[bytes]]]:
    """The numeric table and the categorical columns, one series at a time."""
    found = {("feature", t.name): t.values for t in inputs} | {("output", t.name): t.values for t in outputs}

    def column(series: Series) -> np.ndarray:
        values = found[series.kind, series.tensor]
        table = values.reshape(values.shape[0], -1)
        return table[:, 0 if series.column is None else series.column]

    numeric = np.column_stack([column(s).astype(np.float64) for s in schema.numeric])
    categorical = [[as_category(v) for v in column(s).tolist()] for s in schema.categorical]
    return numeric, categorical


def drift(**keys: object) -> Drift:
    return Drift(window=10, capture=10, **keys)


def feature(name: str, tensor: str, column: int | None, categorical: bool = False) -> DriftFeature:
    return DriftFeature(name=name, input=tensor, column=column, categorical=categorical)


@pytest.mark.parametrize(
    "features",
    [
        (),  # every column of every input: each numeric tensor is read as one block
        (
            feature("c1", "counts", 1),
            feature("f2", "features", 2),
            feature("f0", "features", 0),
            feature("code", "codes", None, categorical=True),
        ),  # a few columns, out of order
        tuple(feature(f"f{i}", "features", i) for i in range(4)),  # all of a tensor's columns, named one by one
    ],
    ids=["discovered", "chosen columns", "named columns"],
)
def test_rows_hold_each_series_column_as_read_one_by_one(features):
    rng = np.random.default_rng(3)
    schema = discover(drift(features=features), *call(rng))
    for _ in range(5):
        inputs, outputs = call(rng)
        rows = schema.rows(inputs, outputs)
        numeric, categorical = naive(schema, inputs, outputs)
        np.testing.assert_array_equal(rows.numeric, numeric)
        assert [rows.categorical[:, j].tolist() for j in range(rows.categorical.shape[1])] == categorical


def test_a_tensor_read_as_a_block_still_refuses_another_width_and_bytes():
    rng = np.random.default_rng(4)
    schema = discover(drift(), *call(rng))
    inputs, outputs = call(rng)
    narrow = [tensor("features", "FP32", np.zeros((6, 3), np.float32)), *inputs[1:]]
    with pytest.raises(TensorError, match="features: 3 columns, expected 4") as error:
        schema.rows(narrow, outputs)
    assert error.value.reason == "shape_mismatch"
    text = np.empty((6, 4), dtype=object)
    text[:] = b"x"
    with pytest.raises(TensorError) as error:
        schema.rows([tensor("features", "BYTES", text), *inputs[1:]], outputs)
    assert error.value.reason == "dtype_mismatch"


def test_blanks_count_the_empty_values_of_each_categorical_series():
    rng = np.random.default_rng(5)
    schema = discover(drift(), *call(rng))
    assert [s.name for s in schema.categorical] == ["codes", "label"]
    for _ in range(5):
        rows = schema.rows(*call(rng))
        expected = [sum(v == b"" for v in rows.categorical[:, j]) for j in range(rows.categorical.shape[1])]
        assert blanks(rows).tolist() == expected
        assert blanks(rows).dtype == np.int64
    empty = schema.rows(*call(rng, rows=0))
    assert blanks(empty).tolist() == [0, 0]
