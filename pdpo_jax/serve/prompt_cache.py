"""Prefilled prompts kept for reuse: a request whose prompt was prefilled before skips its prefill.

A prompt's prefill is a pure function of its token ids, so the batch-1 cache and first-token
logits it produced can be written into another slot instead of computing them again: the slot
then holds bit for bit what a fresh prefill would have left there, and greedy output still equals
`pdpo_jax.generate`'s. Repeated prompts are common in serving: `n` choices of one prompt, a
client's retries, a benchmark or an evaluation that sends a prompt to several sampling settings.

Only whole prompts are reused. Reusing a shared prefix (a judge's instructions) would prefill the
rest of the prompt against cached keys in a different shape than `generate` does, and the
floating-point sums, hence near-tie tokens, could differ from `generate`'s.

Entries are kept least recently used first out, within a byte budget. Which entries are kept
depends only on the order of the prompts admitted, so the processes serving one model on several
hosts, which admit the same prompts in the same order, hit and miss alike.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Prefilled:
    """What a prompt's prefill left: its batch-1 cache (as wide as its bucket) and next-token
    logits on the device, and how much they take."""

    cache: Any
    logits: Any
    nbytes: int


class PromptCache:
    """Prefilled prompts by their token ids, at most `budget_bytes` in all (0: nothing is kept)."""

    def __init__(self, budget_bytes: int):
        if budget_bytes < 0:
            raise ValueError(f"the prompt cache's budget must be >= 0 bytes, got {budget_bytes}")
        self.budget_bytes = int(budget_bytes)
        self._entries: OrderedDict[tuple[int, ...], Prefilled] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, prompt_ids: tuple[int, ...]) -> Prefilled | None:
        """The prompt's prefill if kept (it becomes the most recently used), else None; counted."""
        entry = self._entries.get(prompt_ids)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(prompt_ids)
        self.hits += 1
        return entry

    def put(self, prompt_ids: tuple[int, ...], entry: Prefilled) -> None:
        """Keeps `entry`, dropping the least recently used ones to stay within the budget; an entry
        larger than the whole budget is not kept."""
        if entry.nbytes > self.budget_bytes:
            return
        old = self._entries.pop(prompt_ids, None)
        if old is not None:
            self.bytes -= old.nbytes
        while self._entries and self.bytes + entry.nbytes > self.budget_bytes:
            _, dropped = self._entries.popitem(last=False)
            self.bytes -= dropped.nbytes
        self._entries[prompt_ids] = entry
        self.bytes += entry.nbytes

    def describe(self) -> dict[str, int]:
        return {"entries": len(self._entries), "bytes": self.bytes, "budget_bytes": self.budget_bytes,
                "hits": self.hits, "misses": self.misses}
