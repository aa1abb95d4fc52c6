"""The prompt cache's bookkeeping: least recently used out first, within its byte budget."""

from __future__ import annotations

import pytest

from pdpo_jax.serve.prompt_cache import Prefilled, PromptCache


def entry(nbytes: int) -> Prefilled:
    return Prefilled(cache=f"cache of {nbytes}", logits=None, nbytes=nbytes)


def test_entries_leave_least_recently_used_first_within_the_budget():
    cache = PromptCache(100)
    cache.put((1,), entry(40))
    cache.put((2,), entry(40))
    assert cache.get((1,)) is not None  # (1,) is now the most recently used
    cache.put((3,), entry(40))  # 120 > 100: (2,) goes
    assert cache.get((2,)) is None
    assert cache.get((1,)).cache == "cache of 40" and cache.get((3,)) is not None
    assert cache.describe() == {"entries": 2, "bytes": 80, "budget_bytes": 100, "hits": 3, "misses": 1}


def test_a_prompt_put_again_is_replaced_not_counted_twice():
    cache = PromptCache(100)
    cache.put((1, 2), entry(30))
    cache.put((1, 2), entry(50))
    assert len(cache) == 1 and cache.bytes == 50


def test_an_entry_over_the_budget_is_not_kept_and_evicts_nothing():
    cache = PromptCache(100)
    cache.put((1,), entry(60))
    cache.put((2,), entry(101))
    assert cache.get((2,)) is None and cache.get((1,)) is not None
    assert cache.bytes == 60


def test_a_zero_budget_keeps_nothing_and_a_negative_one_is_refused():
    cache = PromptCache(0)
    cache.put((1,), entry(1))
    assert len(cache) == 0
    with pytest.raises(ValueError, match="budget must be >= 0"):
        PromptCache(-1)
