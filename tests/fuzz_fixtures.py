"""What the property tests (tests/test_fuzz_*.py) share: their example budget and time bound."""

from __future__ import annotations

from hypothesis import settings


def examples(share: float = 1.0) -> int:
    """`share` of the loaded profile's example budget (tests/conftest.py), at least 5: a surface
    whose examples are slow (an HTTP run each) takes a smaller share."""
    return max(5, round(settings.default.max_examples * share))
