"""Compiles one program ahead of time for a TPU slice and reads off what it needs per chip.

The TPU compiler itself refuses a program that cannot fit in HBM (RESOURCE_EXHAUSTED); that
refusal is a result here, not a crash: it comes back as a `Compiled` that does not fit, with the
compiler's own words about the bytes. What a compile says of a program is kept
(`pdpo_jax.planning.analyses`), so a program planned before is not compiled again.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import asdict, dataclass, replace

import jax

from pdpo_jax.planning import analyses
from pdpo_jax.planning.analyses import Analysis
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
    kept: bool = False  # every figure from an earlier plan's compiles (`pdpo_jax.planning.analyses`)

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


@contextlib.contextmanager
def _nothing_written_to_the_jax_cache():
    """JAX's persistent cache would keep the executable, but cannot load back one compiled for a
    compile-only TPU topology (it warns on every read): it is written only past a compile time."""
    setting = "jax_persistent_cache_min_compile_time_secs"
    before = getattr(jax.config, setting)
    jax.config.update(setting, float("inf"))
    try:
        yield
    finally:
        jax.config.update(setting, before)


def analyze(program: Program) -> Analysis:
    """The compiler's figures for `program`: kept ones when this very program was compiled before
    (`kept` set), else from compiling it now."""
    lowered = program.jitted.lower(*program.args)
    key = analyses.analysis_key(lowered, program.args)
    kept = analyses.load(key)
    if kept is not None:
        return kept
    started = time.perf_counter()
    try:
        with _nothing_written_to_the_jax_cache():
            executable = lowered.compile()
    except Exception as err:  # noqa: BLE001 - only the compiler's out-of-memory refusal is a result
        message = " ".join(str(err).split())
        if not OUT_OF_MEMORY.search(message):
            raise
        analysis = Analysis(None, None, 0, time.perf_counter() - started, refusal=message[:600])
    else:
        stats = executable.memory_analysis()
        analysis = Analysis(asdict(Memory.of(stats)), asdict(Cost.of(executable.cost_analysis())),
                            int(stats.generated_code_size_in_bytes), time.perf_counter() - started)
    analyses.save(key, analysis)
    return analysis


def _cost(program: Program, used: list[Analysis]) -> Cost:
    analysis = analyze(program)
    used.append(analysis)
    if analysis.cost is None:
        raise RuntimeError(f"{program.name}: the compiler refused a program compiled only for its cost: "
                           f"{analysis.refusal}")
    return Cost(**analysis.cost)


def _loop_corrected_cost(program: Program, used: list[Analysis]) -> Cost:
    """The program's cost per execution, its micro-batch loop counted in full; every analysis read
    is appended to `used`."""
    if program.cost_program is not None:
        return _loop_corrected_cost(program.cost_program, used)
    cost = _cost(program, used)
    if program.outside is not None and program.loop_trips > 1:
        cost = cost.repeated_body(_cost(program.outside, used), program.loop_trips)
    return cost


def compile_program(program: Program, chip: Chip) -> Compiled:
    """The program's memory per chip and cost per execution, from its own compile and those of its
    cost programs (loop outsides, layer probes); `compile_seconds` sums them, `cached` says that
    every one was kept from an earlier plan."""
    analysis = analyze(program)
    used = [analysis]
    memory = cost = None
    if analysis.memory is not None:
        if program.layer_probes is None:
            cost = _loop_corrected_cost(program, used)
        else:
            one, two = (_loop_corrected_cost(probe, used) for probe in program.layer_probes)
            cost = one.plus(two.minus(one).times(program.layers - 1))
        memory = replace(Memory(**analysis.memory), resident=program.resident_bytes)
    return Compiled(program, memory, cost, analysis.code_bytes, sum(a.compile_seconds for a in used), chip.hbm_bytes,
                    refusal=analysis.refusal, kept=all(a.kept for a in used))


def argument_bytes(program: Program) -> int:
    """Per-chip bytes of the program's arguments (and resident buffers), known before compiling."""
    return per_chip_bytes(program.args) + program.resident_bytes
