"""How a second model moved the DNLI candidate scores of a first one, category by category.

Reads the per-example sidecars `eval-dnli` writes (REPORT.examples.jsonl) of two models on the same
files and prints, per category, the mean change of the candidates' summed log-likelihood, and the
mean rank of the gold response. Argmax shares move only once these shifts pass each other, so this
shows the direction of small updates that the Hits/Contradict table cannot yet see.

Usage: python scripts/compare_dnli_scores.py BEFORE.examples.jsonl AFTER.examples.jsonl [LABEL_BEFORE LABEL_AFTER]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np


def load(path: str) -> dict[str, dict]:
    with open(path, encoding="utf-8") as handle:
        return {row["id"]: row for row in map(json.loads, handle) if row}


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    before, after = load(argv[0]), load(argv[1])
    names = argv[2:4] or ["before", "after"]
    common = sorted(set(before) & set(after))
    if not common:
        print("no example ids in common", file=sys.stderr)
        return 2
    shifts: dict[str, list[float]] = defaultdict(list)
    for example_id in common:
        a, b = before[example_id], after[example_id]
        for category, old, new in zip(a["categories"], a["logps"], b["logps"]):
            shifts[category].append(new - old)
    print(f"{len(common)} examples; mean change of summed log-likelihood ({names[1]} - {names[0]}):")
    print("| category | candidates | mean change | change vs. gold |")
    print("| --- | ---: | ---: | ---: |")
    gold = float(np.mean(shifts["hits"]))
    for category in ("hits", "entail", "rand", "contradict"):
        values = np.asarray(shifts[category])
        print(f"| {category} | {len(values)} | {values.mean():+.4f} | {values.mean() - gold:+.4f} |")
    ranks = [np.mean([m[i]["gold_rank"] for i in common]) for m in (before, after)]
    print(f"mean gold rank (1 = first of the candidates): {names[0]} {ranks[0]:.2f}, {names[1]} {ranks[1]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
