"""`metrics.jsonl`, the training log of a stage: one JSON object per line,
`{"step": int, "split": "train" | "val", <metric>: number | null, ...}`.

The training loop writes it (`MetricsLog`, with TensorBoard scalars beside it); reports, plots
and the DPO start check read it (`read_metrics_jsonl`).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from pdpo_jax.storage import atomic_write_text, jsonl_objects


class MetricsLog:
    """`metrics.jsonl` plus TensorBoard scalars; lines past `resume_step` are dropped on open
    (all of them when -1), so a resumed log equals an uninterrupted one."""

    def __init__(self, stage_dir: Path, resume_step: int, enabled: bool = True):
        self.path = stage_dir / "metrics.jsonl"
        self.enabled = enabled  # one writer per run: the first process
        self._tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if _line_step(line) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter

        self._tensorboard = SummaryWriter(str(stage_dir / "tensorboard"))

    def write(self, step: int, split: str, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "split": split, **{k: json_float(v) for k, v in values.items()}}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        for name, value in values.items():
            if math.isfinite(value):
                self._tensorboard.add_scalar(f"{split}/{name}", value, step)

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


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
    path = Path(path)
    rows = []
    for where, row in jsonl_objects(path):
        if not isinstance(row.get("step"), (int, float)) or isinstance(row.get("step"), bool):
            raise ValueError(f"{where}: missing numeric key 'step'")
        row.setdefault("split", "train")
        rows.append(row)
    return rows
