"""The comparison kernels (kernels/agreement.py) against naive references: Python floats element by element, and
numpy's own argmax."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from mlmirror.kernels.agreement import argmax_agreement, differences

from tests.support import naive_differences

SPECIAL = [0.0, -0.0, 1.0, -1.0, 1e-300, 1e300, math.inf, -math.inf, math.nan]
FLOATS = st.one_of(st.sampled_from(SPECIAL), st.floats(allow_nan=True, allow_infinity=True, width=64))


def assert_same(result: tuple, expected: tuple) -> None:
    assert result[0] is expected[0]
    assert result[1][3] == expected[1][3]
    for got, want in zip(result[1][:3], expected[1][:3], strict=True):
        assert math.isclose(got, want, rel_tol=1e-12, abs_tol=0.0) or (math.isinf(got) and got == want)


@given(
    st.lists(st.tuples(FLOATS, FLOATS), max_size=40),
    st.sampled_from([0.0, 1e-6, 0.5]),
    st.sampled_from([0.0, 1e-5, 0.5]),
)
def test_differences_match_the_element_by_element_reference(pairs, atol, rtol):
    p = [a for a, _ in pairs]
    s = [b for _, b in pairs]
    with np.errstate(over="ignore", invalid="ignore"):
        expected = naive_differences(p, s, atol, rtol)
    assert_same(differences(np.array(p, dtype=np.float64), np.array(s, dtype=np.float64), atol, rtol), expected)


def test_differences_by_hand():
    assert differences(np.array([1.0, 2.0]), np.array([1.0, 2.0]), 0.0, 0.0) == (True, (0.0, 0.0, 0.0, 2))
    assert differences(np.array([1.0]), np.array([4.0]), 0.0, 0.0) == (False, (3.0, 9.0, 3.0, 1))
    assert differences(np.array([1.0]), np.array([1.5]), 0.5, 0.0)[0]
    assert not differences(np.array([0.5]), np.array([1.0]), 0.0, 0.5)[0]  # relative to production
    # infinity matches only itself; NaN only NaN; neither counts in the statistics
    assert differences(np.array([math.inf, math.nan]), np.array([math.inf, math.nan]), 0.0, 1.0) == (
        True,
        (0.0, 0.0, 0.0, 0),
    )
    assert not differences(np.array([math.inf]), np.array([1.0]), 0.0, 1.0)[0]
    assert not differences(np.array([math.nan]), np.array([1.0]), 1.0, 1.0)[0]
    assert differences(np.array([], dtype=np.float64), np.array([], dtype=np.float64), 0.0, 0.0) == (
        True,
        (0.0, 0.0, 0.0, 0),
    )


@pytest.mark.parametrize("dtype", [np.int8, np.uint32, np.int64, np.float16, np.float32])
def test_differences_of_any_dtype_are_taken_in_float64_without_wrapping(dtype):
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else np.finfo(dtype)
    p = np.array([info.min, info.max, 0]).astype(dtype)
    s = np.array([info.max, info.min, 0]).astype(dtype)
    spread = float(info.max) - float(info.min)
    result = differences(p.reshape(3, 1), s, 0.0, 0.0)  # any shape: the elements count
    assert result == (False, (2 * spread, 2 * spread**2, spread, 3))


def test_differences_of_different_sizes_are_refused():
    with pytest.raises(ValueError, match="3 production elements against 2"):
        differences(np.zeros(3), np.zeros(2), 0.0, 0.0)


ROWS = st.integers(1, 6).flatmap(
    lambda k: st.tuples(
        hnp.arrays(
            np.float64,
            st.tuples(st.integers(0, 8), st.just(k)),
            elements=st.sampled_from([0.0, 0.5, 1.0, math.nan, -math.inf]),
        ),
        st.randoms(use_true_random=False),
    )
)


@given(ROWS)
def test_argmax_agreement_is_numpys_argmax_row_by_row(case):
    production, random = case
    shadow = production.copy()
    for index in np.ndindex(shadow.shape):  # change about a third of the values: some rows keep their argmax
        if random.random() < 0.3:
            shadow[index] = random.choice([0.0, 0.25, 1.0, 2.0, math.nan])
    expected = int(np.count_nonzero(production.argmax(axis=1) == shadow.argmax(axis=1))) if len(production) else 0
    assert argmax_agreement(production, shadow) == expected
    assert argmax_agreement(production.astype(np.float32), shadow.astype(np.float32)) == expected


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float16, np.bool_])
def test_argmax_agreement_of_other_dtypes(dtype):
    production = np.array([[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 1, 0]]).astype(dtype)
    shadow = np.array([[0, 1, 0], [0, 1, 0], [0, 0, 1], [0, 1, 1]]).astype(dtype)
    expected = int(np.count_nonzero(production.argmax(axis=1) == shadow.argmax(axis=1)))
    assert expected == 2  # rows 0 and 2 (row 3: the first of the tied largest is 0 against 1)
    assert argmax_agreement(production, shadow) == expected
    assert argmax_agreement(production, shadow.astype(np.float64)) == expected  # mixed: both in float64


def test_int64_beyond_float_precision_keep_their_order():
    big = 2**62
    production = np.array([[big, big + 1]], dtype=np.int64)
    assert np.float64(big) == np.float64(big + 1)  # a float64 comparison would call them tied
    assert argmax_agreement(production, np.array([[big + 1, big]], dtype=np.int64)) == 0
    assert argmax_agreement(production, production.copy()) == 1


@pytest.mark.parametrize("shapes", [((2, 3), (3, 2)), ((6,), (6,)), ((2, 0), (2, 0))])
def test_argmax_agreement_needs_two_matching_row_tables(shapes):
    with pytest.raises(ValueError, match="argmax over rows"):
        argmax_agreement(np.zeros(shapes[0]), np.zeros(shapes[1]))
