"""The items of a human study: two models' responses to one test turn (the judge's own unit,
`PairItem`), taken from a judge output folder (the pairs the judge saw, A and B as it had them) or
from two responses files (every turn both answer; A is the first file's model).

    study_items(["runs/x/judge"])
    study_items(["runs/x/test_responses/dpo.jsonl", "runs/x/test_responses/sft.jsonl"])
    study_items(["wo-shuffle=runs/y/test_responses/dpo.jsonl", "runs/x/test_responses/dpo.jsonl"])  # NAME=FILE renames
    sample_items(items, 100, seed=0)   # a seeded subset, in the items' order
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

from pdpo_jax.annotation.errors import StudyError
from pdpo_jax.annotation.judge_output import judged_responses, read_judged_pairs
from pdpo_jax.evaluate.judge_pairs import PairItem, ResponseSet, common_ids, load_responses, make_item
from pdpo_jax.object_store import as_path, is_object_store

SOURCES_HELP = "a judge output folder, or two responses files (NAME=FILE names a file's model)"


def study_items(sources: Sequence[str]) -> list[PairItem]:
    """The items `sources` describe: one judge output folder, or two responses files."""
    if len(sources) == 1 and (is_object_store(sources[0]) or as_path(sources[0]).is_dir()):  # a bucket has no folders
        items = items_from_judge_output(sources[0])
    elif len(sources) == 2:
        items = items_from_responses(sources)
    else:
        raise StudyError(f"--pairs takes {SOURCES_HELP}; got {list(sources)}")
    keys = set()
    for item in items:
        key = (item.id, item.model_a, item.model_b)
        if key in keys:
            raise StudyError(f"{list(sources)}: the pair {key} comes twice")
        keys.add(key)
    return items


def items_from_judge_output(folder: str) -> list[PairItem]:
    responses = judged_responses(folder)
    items = []
    for pair in read_judged_pairs(folder):
        for model in (pair.model_a, pair.model_b):
            if model not in responses:
                raise StudyError(f"{folder}: the judge compared {model!r}, but its results name no responses file for it")
            if pair.id not in responses[model].records:
                raise StudyError(f"{responses[model].path}: no response with id {pair.id!r}, which the judge compared")
        items.append(make_item(pair.id, responses[pair.model_a], responses[pair.model_b]))
    return items


def items_from_responses(specs: Sequence[str]) -> list[PairItem]:
    a, b = (named_responses(spec) for spec in specs)
    return [make_item(example_id, a, b) for example_id in common_ids([a, b])]


def named_responses(spec: str) -> ResponseSet:
    """A responses file, `NAME=FILE` giving its model another name (a path that exists is a path)."""
    name, sep, path = spec.partition("=")
    if not sep or as_path(spec).exists():
        return load_responses(spec)
    if not name:
        raise StudyError(f"{spec!r}: expected FILE or NAME=FILE")
    return dataclasses.replace(load_responses(path), model=name)


def sample_items(items: Sequence[PairItem], count: int | None, seed: int) -> list[PairItem]:
    """`count` of the items picked with `seed`, in their order (all of them when count is None or larger)."""
    if count is None or count >= len(items):
        return list(items)
    if count < 1:
        raise StudyError(f"--sample must be at least 1, got {count}")
    keep = sorted(random.Random(seed).sample(range(len(items)), count))
    return [items[i] for i in keep]
