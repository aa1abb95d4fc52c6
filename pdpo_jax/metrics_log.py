"""`metrics.jsonl`, the training log of a stage: one JSON object per line,
`{"step": int, "split": "train" | "val", <metric>: number | null, ...}`.

The training loop writes it (`MetricsLog`, with TensorBoard scalars beside it); reports, plots
and the DPO start check read it (`read_metrics_jsonl`).

In a gs:// stage folder an object cannot be appended to: the lines are kept and the whole file is
uploaded at each `flush` (the loop flushes at every checkpoint, and lines after the last checkpoint
are dropped on resume anyway), and the TensorBoard events are written to a local folder and
uploaded to `<stage>/tensorboard/` at each flush (tensorboardX cannot write to gs:// itself).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pdpo_jax.object_store import as_path, is_object_store
from pdpo_jax.storage import atomic_write_bytes, atomic_write_text, jsonl_objects


class MetricsLog:
    """`metrics.jsonl` plus TensorBoard scalars; lines past `resume_step` are dropped on open
    (all of them when -1), so a resumed log equals an uninterrupted one."""

    def __init__(self, stage_dir: Path, resume_step: int, enabled: bool = True):
        stage_dir = as_path(stage_dir)
        self.path = stage_dir / "metrics.jsonl"
        self.enabled = enabled  # one writer per run: the first process
        self._tensorboard = None
        self._remote = is_object_store(stage_dir)
        self._lines: list[str] = []  # on gs://: the whole file, uploaded at each flush
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _line_step(line) <= resume_step]
            self._lines = [line + "\n" for line in kept]
            atomic_write_text(self.path, "".join(self._lines))
        from tensorboardX import SummaryWriter

        self._tensorboard_remote = stage_dir / "tensorboard"
        self._tensorboard_dir = (Path(tempfile.mkdtemp(prefix="pdpo-tensorboard-")) if self._remote
                                 else self._tensorboard_remote)
        self._tensorboard = SummaryWriter(str(self._tensorboard_dir))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: json_float(v) for k, v in values.items()}}
        if self._remote:
            self._lines.append(json.dumps(record) + "\n")
        else:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def flush(self) -> None:
        """Makes every line written so far durable (on disk it already is)."""
        if not (self.enabled and self._remote):
            return
        atomic_write_text(self.path, "".join(self._lines))
        self._tensorboard.flush()
        for event_file in sorted(self._tensorboard_dir.iterdir()):
            atomic_write_bytes(self._tensorboard_remote / event_file.name, event_file.read_bytes())

    def close(self) -> None:
        if self._tensorboard is not None:
            self.flush()
            self._tensorboard.close()
            if self._remote:
                shutil.rmtree(self._tensorboard_dir, ignore_errors=True)


def _line_step(line: str) -> float:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn line: drop it


def json_float(value: float) -> float | None:
    """JSON has no NaN or infinity: such a value is written as null."""
    return value if math.isfinite(value) else None


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """metrics.jsonl lines: {"step": int, "split": "train"|"val", metric: number, ...}."""
    rows = []
    for where, row in jsonl_objects(path):
        if not isinstance(row.get("step"), (int, float)) or isinstance(row.get("step"), bool):
            raise ValueError(f"{where}: missing numeric key 'step'")
        row.setdefault("split", "train")
        rows.append(row)
    return rows
