"""The hypothesis profile tests run under: ``ci`` unless ``$HYPOTHESIS_PROFILE`` says otherwise, and under it the
examples a test sees are the same on every run (no random seed, no database of earlier runs)."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st


def drawn() -> list[tuple[int, bytes]]:
    """The examples one @given test sees in one run."""
    seen: list[tuple[int, bytes]] = []

    @settings(max_examples=30)
    @given(st.integers(), st.binary(max_size=16))
    def record(number: int, blob: bytes) -> None:
        seen.append((number, blob))

    record()
    return seen


def test_ci_is_the_default_profile_and_it_is_deterministic():
    profile = os.environ.get("HYPOTHESIS_PROFILE", "ci")
    assert profile in ("ci", "explore")
    assert settings.default.deadline is None
    if profile == "ci":
        assert settings.default.derandomize
        assert settings.default.database is None
        first, second = drawn(), drawn()
        assert len(first) >= 10
        assert first == second
    else:  # exploring: random on purpose, and more of it
        assert not settings.default.derandomize
        assert settings.default.max_examples >= 1000
