"""Sentence pairs as classifier input: token ids, `[rows, length]` batches, and the held-out split.

A pair is one text, `premise + "\\n" + hypothesis`, tokenized in one call with the tokenizer's own
special tokens (a Llama tokenizer's BOS), so a user of the exported classifier feeds it with a plain
`tokenizer(premise + "\\n" + hypothesis)`. Trailing pad ids are dropped, so the class is read at a
real token by both this code and transformers (see `pdpo_jax.model.classifier`). A pair longer than
`max_length` keeps its last `max_length` tokens: the hypothesis, at the end, stays whole.

Batches carry `input_ids`, `positions`, `segment_ids` (`[rows, length]`, right-padded),
`labels` and `label_mask` (`[rows]`; filler rows have mask 0).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdpo_jax.data.examples import split_fraction
from pdpo_jax.data.nli_pairs import NliPair

PAIR_SEPARATOR = "\n"


@dataclass(frozen=True)
class EncodedPair:
    ids: tuple[int, ...]
    label: int  # index into the classifier's labels; -1 when unknown (scoring only)
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.ids)


def encode_pair(tokenizer: Any, premise: str, hypothesis: str, *, max_length: int, pad_id: int,
                label: int = -1) -> EncodedPair:
    ids = list(tokenizer(premise + PAIR_SEPARATOR + hypothesis, add_special_tokens=True)["input_ids"])
    while ids and ids[-1] == pad_id:
        ids.pop()
    if not ids:
        raise ValueError(f"the pair {premise!r} / {hypothesis!r} encodes to no tokens")
    truncated = len(ids) > max_length
    return EncodedPair(tuple(ids[-max_length:]), label, truncated)


def encode_pairs(tokenizer: Any, pairs: Sequence[NliPair], labels: Sequence[str], *, max_length: int,
                 pad_id: int) -> list[EncodedPair]:
    """Labelled pairs, their labels as indices into `labels` (the classifier's class order)."""
    index = {label: i for i, label in enumerate(labels)}
    missing = sorted({p.label for p in pairs} - set(index))
    if missing:
        raise ValueError(f"pair labels {missing} are not among the classifier's labels {list(labels)}")
    return [encode_pair(tokenizer, p.sentence1, p.sentence2, max_length=max_length, pad_id=pad_id, label=index[p.label])
            for p in pairs]


def nli_batch(pairs: Sequence[EncodedPair | None], length: int, pad_id: int = 0) -> dict[str, np.ndarray]:
    """One pair per row, right-padded to `length`; `None` entries are filler rows."""
    rows = len(pairs)
    batch = {
        "input_ids": np.full((rows, length), pad_id, np.int32),
        "positions": np.zeros((rows, length), np.int32),
        "segment_ids": np.zeros((rows, length), np.int32),
        "labels": np.zeros((rows,), np.int32),
        "label_mask": np.zeros((rows,), np.float32),
    }
    for row, pair in enumerate(pairs):
        if pair is None:
            continue
        if len(pair) > length:
            raise ValueError(f"a pair of {len(pair)} tokens does not fit in rows of {length}")
        n = len(pair)
        batch["input_ids"][row, :n] = pair.ids
        batch["positions"][row, :n] = np.arange(n)
        batch["segment_ids"][row, :n] = 1
        batch["labels"][row] = max(pair.label, 0)
        batch["label_mask"][row] = 1.0 if pair.label >= 0 else 0.0
    return batch


def split_pairs(pairs: Sequence[NliPair], val_fraction: float, seed: int) -> tuple[list[NliPair], list[NliPair]]:
    """(train, validation): a pair is held out when its id's stable draw falls below `val_fraction`,
    so the split does not move when pairs are added or reordered."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"the validation fraction must lie in (0, 1), got {val_fraction}")
    train, val = [], []
    for pair in pairs:
        (val if split_fraction(f"nli:{pair.id}", seed) < val_fraction else train).append(pair)
    return train, val
