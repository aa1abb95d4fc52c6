"""The configured corpus of a run: read, cleaned of DNLI-overlapping dialogues, split by dialogue.

Every stage (SFT, preference building, DPO, the pipeline's report) calls `prepare_corpus` with the
run's `data` section, so they all see the same train/val/test dialogues.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from pdpo_jax.data.dialogue import Dialogue
from pdpo_jax.data.dnli import read_dnli
from pdpo_jax.data.examples import Example, examples_from_dialogues, split_dialogues
from pdpo_jax.data.loading import load_dialogues
from pdpo_jax.data.overlap import OverlapReport, drop_overlapping


@dataclass(frozen=True)
class Corpus:
    train: list[Dialogue]
    val: list[Dialogue]
    test: list[Dialogue]
    overlap: OverlapReport | None  # what the DNLI overlap filter dropped (None: no filter asked for)

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"train_dialogues": len(self.train), "val_dialogues": len(self.val),
                                   "test_dialogues": len(self.test)}
        if self.overlap is not None:
            summary["overlap_filter"] = self.overlap.summary()
        return summary


def prepare_corpus(data: Any, seed: int) -> Corpus:
    """`data` is a `DataSection`. Without explicit `val` files the dialogues are split by
    `split_fractions`; with them, `test_fraction` of the validation dialogues become the test
    split. The overlap filter applies to every file, validation included, because selecting a
    model on DNLI's source dialogues would leak too."""
    if not data.train:
        raise ValueError("data.train is empty: name at least one dialogue file")
    dialogues = _read_all(data.train, data)
    val_given = _read_all(data.val, data) if data.val else None
    overlap = None
    if data.exclude_dnli:
        dnli = [example for path in data.exclude_dnli for example in read_dnli(path, protocol="all")]
        dialogues, overlap = drop_overlapping(dialogues + (val_given or []), dnli)
        if val_given is not None:
            val_ids = {d.id for d in val_given}
            val_given = [d for d in dialogues if d.id in val_ids]
            dialogues = [d for d in dialogues if d.id not in val_ids]
    if data.max_dialogues is not None:
        dialogues = dialogues[: data.max_dialogues]
    if val_given is not None:
        if not 0.0 <= data.test_fraction < 1.0:
            raise ValueError(f"data.test_fraction must be in [0, 1), got {data.test_fraction}")
        val, test = split_dialogues(val_given, (1.0 - data.test_fraction, data.test_fraction), seed=seed)
        if data.max_val_dialogues is not None:
            val = val[: data.max_val_dialogues]
        if not val:
            raise ValueError(f"no validation dialogues left of {len(val_given)} after data.test_fraction")
        return Corpus(train=dialogues, val=val, test=test, overlap=overlap)
    train, val, test = split_dialogues(dialogues, tuple(data.split_fractions), seed=seed)
    if not train or not val:
        raise ValueError(
            f"splitting {len(dialogues)} dialogues by {data.split_fractions} left an empty train or val split"
        )
    return Corpus(train=train, val=val, test=test, overlap=overlap)


def pick_test_turns(corpus: Corpus, count: int | None, seed: int) -> list[Example]:
    """The test dialogues' model turns that answer a partner line (an opening turn has nothing to
    answer, so it says little about persona consistency): all of them in corpus order, or `count`
    of them picked with `seed`."""
    examples = [e for e in examples_from_dialogues(corpus.test) if e.history]
    if count is None:
        return examples
    return random.Random(seed).sample(examples, min(count, len(examples)))


def _read_all(paths: list[str], data: Any) -> list[Dialogue]:
    return [d for path in paths for d in load_dialogues(path, format=data.format, both_speakers=data.both_speakers)]
