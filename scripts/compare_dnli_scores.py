"""How a second model moved the DNLI candidate scores of a first one, category by category.

Reads the per-example sidecars `eval-dnli` writes (REPORT.examples.jsonl) of two models on the same
files and prints, per category, the mean change of the candidates' summed log-likelihood, and the
mean rank of the gold response (`pdpo_jax.evaluate.dnli_shifts`; `pdpo results` writes the same
table for every model of a results table).

Usage: python scripts/compare_dnli_scores.py BEFORE.examples.jsonl AFTER.examples.jsonl [LABEL_BEFORE LABEL_AFTER]
"""

from __future__ import annotations

import sys

from pdpo_jax.evaluate.dnli_shifts import ScoreShiftError, score_shifts, score_shifts_markdown
from pdpo_jax.storage import read_jsonl


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 4):
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    names = argv[2:4] or ["before", "after"]
    try:
        shifts = score_shifts(read_jsonl(argv[0]), read_jsonl(argv[1]), before_source=argv[0], after_source=argv[1])
    except (ScoreShiftError, OSError) as err:
        print(err, file=sys.stderr)
        return 2
    print(score_shifts_markdown(shifts, *names), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
