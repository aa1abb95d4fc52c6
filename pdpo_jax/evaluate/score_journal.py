"""The DNLI scores computed so far, kept beside the report, so a stopped evaluation resumes at the
batch where it stopped instead of scoring every candidate again.

The evaluation scores its examples in a fixed plan of batches. Every `WRITE_EVERY_SECONDS` (30 s)
after a batch, process 0 rewrites `REPORT.partial.jsonl`: a header naming the model path and the
settings, then one line per batch scored so far with its example ids and every candidate's summed
log-probability and token count (an evaluation shorter than that writes none). A rerun with the
same header takes those batches as they are, so its records equal an uninterrupted run's. It first
scores the journal's first batch again and compares: if the model at that path has changed (or the
scores are not reproducible there), the journal is dropped and every batch is scored. The report's
writer removes the journal once the report is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from pdpo_jax.object_store import as_path
from pdpo_jax.parallel import is_primary, primary_decides
from pdpo_jax.storage import atomic_write_jsonl, read_jsonl

LOG = logging.getLogger(__name__)
WRITE_EVERY_SECONDS = 30.0  # a journal's rewrites: often enough to lose little, rarely enough for a bucket

Scores = list[tuple[np.ndarray, np.ndarray]]  # per example of a batch: (summed log-probs, token counts)


class ScoreJournal:
    """The batches kept at `path` for this `header` (read on process 0, the same on every process),
    and the batches recorded since, written back by process 0."""

    def __init__(self, path: str | Path, header: dict[str, Any]):
        self.path, self.header = as_path(path), header
        self.kept: dict[int, dict[str, Any]] = {
            int(number): entry for number, entry in primary_decides(self._read).items()}  # every process: process 0's
        self.verified = not self.kept  # nothing to trust or doubt
        self.written: dict[int, dict[str, Any]] = {}
        self.last_write = time.monotonic()
        if self.kept:
            LOG.info("%s: resuming with %d scored batches", self.path, len(self.kept))

    def _read(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        lines = read_jsonl(self.path)
        if not lines or lines[0].get("header") != self.header:
            LOG.info("%s: written for another model path or settings; scoring from the start", self.path)
            return {}
        return {str(line["batch"]): line for line in lines[1:]}

    def kept_scores(self, number: int, ids: list[str]) -> Scores | None:
        """The batch's kept scores, or None when it must be scored (not kept, another plan, or the
        journal not yet checked against a batch scored now)."""
        entry = self.kept.get(number)
        if entry is None or entry["ids"] != ids or not self.verified:
            return None
        self.written[number] = entry
        logps_dtype, counts_dtype = entry["dtypes"]
        return [(np.asarray(logps, logps_dtype), np.asarray(counts, counts_dtype))
                for logps, counts in zip(entry["logps"], entry["counts"])]

    def record(self, number: int, ids: list[str], scores: Scores) -> None:
        """A batch scored now; the journal is rewritten once `WRITE_EVERY_SECONDS` have passed since the last time."""
        entry = {"batch": number, "ids": ids, "dtypes": [scores[0][0].dtype.str, scores[0][1].dtype.str],
                 "logps": [logps.tolist() for logps, _ in scores], "counts": [counts.tolist() for _, counts in scores]}
        if not self.verified:
            kept = self.kept.get(number)
            if kept is not None and all(kept[key] == entry[key] for key in ("ids", "dtypes", "logps", "counts")):
                self.verified = True
            else:
                LOG.warning("%s: batch %d scores differently now (another model at the same path?); "
                            "scoring every batch again", self.path, number)
                self.kept, self.verified = {}, True
        self.written[number] = entry
        if time.monotonic() - self.last_write >= WRITE_EVERY_SECONDS:
            self.write()

    def write(self) -> None:
        if is_primary():
            atomic_write_jsonl(self.path, [{"header": self.header},
                                           *(self.written[number] for number in sorted(self.written))])
        self.last_write = time.monotonic()
