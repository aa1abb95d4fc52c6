"""Compiles one program ahead of time for a TPU slice and reads off what it needs per chip.

The TPU compiler itself refuses a program that cannot fit in HBM (RESOURCE_EXHAUSTED); that
refusal is a result here, not a crash: it comes back as a `Compiled` that does not fit, with the
compiler's own words about the bytes.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from pdpo_jax.planning.programs import Program, per_chip_bytes
from pdpo_jax.planning.roofline import Cost, Memory, bound_by, roofline_seconds
from pdpo_jax.planning.slices import Chip

OUT_OF_MEMORY = re.compile(r"RESOURCE_EXHAUSTED|[Rr]an out of memory|exceeds the .*memory")
REQUIRED = re.compile(r"required for [^(]*\(([\d.]+)([KMGT])\)")  # "... HLO temporaries (143.66G) exceeds ..."
UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


@dataclass(frozen=True)
class Compiled:
    program: Program
    memory: Memory | None  # None when the compiler refused the program for its memory
    cost: Cost | None  # per execution, micro-batch loop counted in full
    code_bytes: int
    compile_seconds: float
    hbm_bytes: int
    refusal: str = ""  # the compiler's message when it refused

    @property
    def fits(self) -> bool:
        return self.memory is not None and self.memory.total <= self.hbm_bytes

    @property
    def need_bytes(self) -> int | None:
        """Per-chip bytes: the memory analysis' total, or what the compiler said it needed when it
        refused the program (None if it did not say)."""
        if self.memory is not None:
            return self.memory.total
        match = REQUIRED.search(self.refusal)
        return int(float(match.group(1)) * UNITS[match.group(2)]) if match else None

    def seconds(self, chip: Chip) -> float | None:
        return None if self.cost is None else roofline_seconds(self.cost, chip.peak_flops, chip.hbm_bandwidth)

    def bound(self, chip: Chip) -> str | None:
        return None if self.cost is None else bound_by(self.cost, chip.peak_flops, chip.hbm_bandwidth)


def _compile(program: Program):
    return program.jitted.lower(*program.args).compile()


def _loop_corrected_cost(program: Program, executable=None) -> Cost:
    """The program's cost per execution; `executable` is the program compiled, when the caller has it
    (a program whose cost comes from its `cost_program` is not compiled for it)."""
    if program.cost_program is not None:
        return _loop_corrected_cost(program.cost_program)
    cost = Cost.of((_compile(program) if executable is None else executable).cost_analysis())
    if program.outside is not None and program.loop_trips > 1:
        outside = Cost.of(_compile(program.outside).cost_analysis())
        cost = cost.repeated_body(outside, program.loop_trips)
    return cost


def compile_program(program: Program, chip: Chip) -> Compiled:
    started = time.perf_counter()
    try:
        executable = _compile(program)
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        message = " ".join(str(err).split())
        if not OUT_OF_MEMORY.search(message):
            raise
        return Compiled(program, None, None, 0, time.perf_counter() - started, chip.hbm_bytes,
                        refusal=message[:600])
    if program.layer_probes is None:
        cost = _loop_corrected_cost(program, executable)
    else:
        one, two = (_loop_corrected_cost(probe) for probe in program.layer_probes)
        cost = one.plus(two.minus(one).times(program.layers - 1))
    stats = executable.memory_analysis()
    memory = Memory.of(stats, resident=program.resident_bytes)
    return Compiled(program, memory, cost, int(stats.generated_code_size_in_bytes), time.perf_counter() - started,
                    chip.hbm_bytes)


def argument_bytes(program: Program) -> int:
    """Per-chip bytes of the program's arguments (and resident buffers), known before compiling."""
    return per_chip_bytes(program.args) + program.resident_bytes
