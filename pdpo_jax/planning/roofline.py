"""What a compiled program needs per chip, and the least time it can take: pure arithmetic on the
compiler's figures and a chip's published peaks.

Memory is `compiled.memory_analysis()` per device: arguments + outputs - the outputs that alias
(reuse) donated arguments + temporaries. Time is the roofline: a step can be no faster than its
FLOPs at the chip's peak FLOP/s, nor than its bytes at the HBM bandwidth, so
max(flops / peak, bytes / bandwidth) is a lower bound (real steps also wait on collectives,
latency and imperfect overlap).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Memory:
    """Per-chip bytes of one compiled program."""

    argument: int
    output: int
    alias: int
    temp: int
    resident: int = 0  # buffers that live beside the program but are not among its arguments

    @classmethod
    def of(cls, stats: Any, resident: int = 0) -> "Memory":
        """From `compiled.memory_analysis()` (a CompiledMemoryStats)."""
        return cls(argument=int(stats.argument_size_in_bytes), output=int(stats.output_size_in_bytes),
                   alias=int(stats.alias_size_in_bytes), temp=int(stats.temp_size_in_bytes), resident=int(resident))

    @property
    def total(self) -> int:
        return self.argument + self.output - self.alias + self.temp + self.resident

    def as_dict(self) -> dict[str, int]:
        return asdict(self) | {"total": self.total}


@dataclass(frozen=True)
class Cost:
    """Per-chip FLOPs and bytes accessed of one execution of a program."""

    flops: float
    bytes_accessed: float

    @classmethod
    def of(cls, analysis: Any) -> "Cost":
        """From `compiled.cost_analysis()` (a dict, or a one-element list of dicts in older jax)."""
        if isinstance(analysis, (list, tuple)):
            analysis = analysis[0] if analysis else {}
        analysis = analysis or {}
        return cls(flops=float(analysis.get("flops", 0.0)), bytes_accessed=float(analysis.get("bytes accessed", 0.0)))

    def repeated_body(self, outside: "Cost", trips: int) -> "Cost":
        """The compiler counts a loop's body once; `self` is such a count of a program made of
        `outside` plus one loop body. Returns the cost with the body run `trips` times."""
        body_flops = max(self.flops - outside.flops, 0.0)
        body_bytes = max(self.bytes_accessed - outside.bytes_accessed, 0.0)
        return Cost(outside.flops + trips * body_flops, outside.bytes_accessed + trips * body_bytes)

    def times(self, n: float) -> "Cost":
        return Cost(self.flops * n, self.bytes_accessed * n)

    def plus(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes_accessed + other.bytes_accessed)

    def minus(self, other: "Cost") -> "Cost":
        return Cost(self.flops - other.flops, self.bytes_accessed - other.bytes_accessed)


def roofline_seconds(cost: Cost, peak_flops: float, hbm_bandwidth: float) -> float:
    """The least time one execution can take on a chip: max(compute time, memory time)."""
    if peak_flops <= 0 or hbm_bandwidth <= 0:
        raise ValueError(f"chip peaks must be positive, got {peak_flops} FLOP/s and {hbm_bandwidth} B/s")
    return max(cost.flops / peak_flops, cost.bytes_accessed / hbm_bandwidth)


def bound_by(cost: Cost, peak_flops: float, hbm_bandwidth: float) -> str:
    return "compute" if cost.flops / peak_flops >= cost.bytes_accessed / hbm_bandwidth else "memory"


def steps_per_epoch(items: int, items_per_step: int) -> int:
    """Steps that cover `items` once (a short last step still costs a whole step)."""
    if items_per_step < 1:
        raise ValueError(f"items per step must be at least 1, got {items_per_step}")
    return math.ceil(max(items, 0) / items_per_step)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_seconds(s: float) -> str:
    if s >= 3600:
        return f"{s / 3600:.1f} h"
    if s >= 60:
        return f"{s / 60:.1f} min"
    if s >= 1:
        return f"{s:.2f} s"
    return f"{s * 1e3:.2f} ms"
