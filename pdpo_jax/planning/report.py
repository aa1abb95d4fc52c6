"""The plan of one run config on one TPU slice: every program compiled for the slice, what each
needs per chip, and the projected time of one epoch of each stage. As a JSON-ready dict
(`plan_run`) and as text (`render_text`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict
from typing import Any, Sequence

import jax
import numpy as np

from pdpo_jax.config import RunConfig
from pdpo_jax.errors import PdpoError
from pdpo_jax.model.architectures import architecture_of
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.parallel import BATCH_AXES, make_mesh
from pdpo_jax.planning.analyses import CACHE_SWITCH_ENV
from pdpo_jax.planning.compile import Compiled, argument_bytes, compile_program
from pdpo_jax.planning.epochs import EpochSizes, epoch_sizes
from pdpo_jax.planning.programs import BUILDERS, PROGRAMS, Program, Shapes, build_program
from pdpo_jax.planning.roofline import format_bytes, format_seconds, steps_per_epoch
from pdpo_jax.planning.slices import TpuSlice, topology_devices

TIME_NOTE = ("times are roofline lower bounds per chip: max(FLOPs / peak FLOP/s, bytes accessed / HBM bandwidth) "
             "from the compiler's counts; collectives, latency and imperfect overlap make real steps slower")
LOOP_NOTE = ("the compiler counts a loop body once: train steps are corrected for their micro-batch loop, a "
             "scanned layer stack by the same program compiled unrolled with 1 and 2 layers, and the DNLI "
             "scorer's chunked vocabulary projection by the scorer compiled with a single chunk")


class PlanError(PdpoError):
    """A config that cannot be laid out on the slice at all (mesh, batch split)."""


class DoesNotFit(PdpoError):
    """A program of the config needs more HBM per chip than the slice's chips have."""


def _mesh(run: RunConfig, tpu: TpuSlice):
    try:
        return make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor, devices=topology_devices(tpu))
    except ValueError as err:
        if isinstance(err, PdpoError):
            raise
        raise PlanError(f"mesh {{data: {run.mesh.data}, fsdp: {run.mesh.fsdp}, tensor: {run.mesh.tensor}}} does not "
                        f"lay out on {tpu.name} ({tpu.chips} chips): {err}") from None


def _check_rows(run: RunConfig, mesh, programs: Sequence[str], shapes: Shapes) -> None:
    split = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    needs = {"sft-step": ("sft.batch_size", run.sft.batch_size), "dpo-step": ("dpo.batch_size", run.dpo.batch_size),
             "dnli-score": ("DNLI rows (--dnli-rows)", shapes.dnli_rows)}
    for name in programs:
        if name in needs and needs[name][1] % split:
            what, rows = needs[name]
            raise PlanError(f"{what} = {rows} rows do not split over data x fsdp = {split} chips of mesh "
                            f"{dict(mesh.shape)}; choose a multiple of {split} or move chips to mesh.tensor")


def _sampler_rows(run: RunConfig, mesh) -> RunConfig:
    """The sampler pads its rows to a multiple of the batch split, as `generate` does."""
    split = int(np.prod([mesh.shape[axis] for axis in BATCH_AXES]))
    rows = -(-run.prefs.batch_size // split) * split
    return dataclasses.replace(run, prefs=dataclasses.replace(run.prefs, batch_size=rows))


def _program_entry(result: Compiled | None, program: Program, tpu: TpuSlice, precheck: int) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": program.name, "stage": program.stage, "shapes": program.shapes,
                             "hbm_bytes": tpu.chip.hbm_bytes}
    if result is None:  # refused before compiling: the arguments alone do not fit
        return entry | {"fits": False, "memory": None, "need_bytes": precheck, "compiled": False,
                        "refusal": f"its arguments alone need {format_bytes(precheck)} per chip"}
    entry |= {"fits": result.fits, "compiled": True, "compile_seconds": round(result.compile_seconds, 1),
              "kept_from_earlier_plan": result.kept,
              "memory": None if result.memory is None else result.memory.as_dict(),
              "need_bytes": result.need_bytes, "code_bytes": result.code_bytes}
    if program.extra.get("resident"):
        entry["resident_note"] = program.extra["resident"]
    if result.refusal:
        return entry | {"refusal": f"the TPU compiler refused it: {result.refusal}"}
    seconds = result.seconds(tpu.chip)
    return entry | {"flops": result.cost.flops, "bytes_accessed": result.cost.bytes_accessed,
                    "seconds": seconds, "bound": result.bound(tpu.chip)}


def _epochs(run: RunConfig, sizes: EpochSizes, programs: dict[str, dict[str, Any]], shapes: Shapes) -> list[dict[str, Any]]:
    def seconds(name: str) -> float | None:
        return programs.get(name, {}).get("seconds")

    rows = []
    if run.sft.packing == "dialogue":
        sft_items, sft_note = sizes.train_dialogues, "packed: at most a row per dialogue"
    else:
        sft_items, sft_note = sizes.train_examples, "a row per model turn"
    rows.append(("sft", sft_items, run.sft.batch_size * run.sft.grad_accum, seconds("sft-step"), run.sft.epochs,
                 sft_note))
    sample = None
    if seconds("prefill") is not None and seconds("decode-step") is not None:
        sample = seconds("prefill") + run.prefs.max_new_tokens * seconds("decode-step")
    rows.append(("make-prefs", sizes.train_examples, run.prefs.batch_size, sample, 1,
                 f"prefill + {run.prefs.max_new_tokens} decode steps a batch (every token sampled); "
                 "reference scoring not included"))
    if run.dpo.layout == "tree":
        dpo_items, dpo_note = sizes.train_dialogues, "tree rows: at least a row per dialogue (more where one is cut)"
    else:
        dpo_items, dpo_note = sizes.train_examples, "a pair per model turn"
    rows.append(("dpo", dpo_items, run.dpo.batch_size * run.dpo.grad_accum, seconds("dpo-step"), run.dpo.epochs,
                 dpo_note))
    if run.eval.dnli:
        dnli_items = sizes.dnli_examples if sizes.dnli_examples is not None else 1000
        note = "every DNLI example once" if sizes.dnli_examples is not None else "per 1,000 DNLI examples"
        rows.append(("eval-dnli", dnli_items, shapes.dnli_rows, seconds("dnli-score"), 1, note))
    out = []
    for stage, items, per_step, step_seconds, epochs, note in rows:
        entry: dict[str, Any] = {"stage": stage, "items": items, "items_per_step": per_step, "epochs": epochs,
                                 "note": note, "step_seconds": step_seconds}
        if items is not None and per_step and step_seconds is not None:
            steps = steps_per_epoch(items, per_step)
            entry |= {"steps": steps, "epoch_seconds": steps * step_seconds}
        out.append(entry)
    return out


def plan_run(run: RunConfig, tpu: TpuSlice, *, config_name: str = "", programs: Sequence[str] = PROGRAMS,
             shapes: Shapes = Shapes(), examples: int | None = None) -> dict[str, Any]:
    """Compiles `programs` of `run` for `tpu` and returns the plan as a JSON-ready dict."""
    unknown = [name for name in programs if name not in BUILDERS]
    if unknown:
        raise PlanError(f"unknown program(s) {unknown}; known: {', '.join(PROGRAMS)}")
    if not run.eval.dnli:
        programs = [name for name in programs if name != "dnli-score"]
    config, source = architecture_of(run.model.path, dtype=run.model.dtype, remat=run.model.remat,
                                     scan_layers=run.model.scan_layers)
    mesh = _mesh(run, tpu)
    _check_rows(run, mesh, programs, shapes)
    sampling_run = _sampler_rows(run, mesh)
    sizes = epoch_sizes(run, examples)
    parameters = int(sum(np.prod(leaf.shape, dtype=np.int64) for leaf in jax.tree.leaves(param_shapes(config))))
    entries: dict[str, dict[str, Any]] = {}
    for name in programs:
        program = build_program(name, sampling_run if name in ("prefill", "decode-step") else run, config, mesh, shapes)
        precheck = argument_bytes(program)
        result = compile_program(program, tpu.chip) if precheck <= tpu.chip.hbm_bytes else None
        entries[name] = _program_entry(result, program, tpu, precheck)
        jax.clear_caches()  # the traced jaxprs of a 40-layer model are large; each program is traced once
    chip = tpu.chip
    return {
        "config": config_name,
        "model": {"path": run.model.path, "architecture": source, "parameters": parameters, "dtype": config.dtype,
                  "remat": config.remat, "scan_layers": config.scan_layers},
        "slice": {"name": tpu.name, "chips": tpu.chips, "hosts": tpu.hosts, "topology": tpu.topology_name,
                  "chip_config": tpu.chip_config_name, "device_view": "one device per chip" + (
                      " (megacore: both TensorCores as one device, as JAX on a TPU VM shows them)" if chip.megacore else ""),
                  "hbm_bytes": chip.hbm_bytes, "peak_flops": chip.peak_flops, "hbm_bandwidth": chip.hbm_bandwidth},
        "mesh": dict(mesh.shape),
        "assumptions": {"shapes": asdict(shapes), "shapes_text": shapes.describe(), "epoch": sizes.describe(),
                        "sampler_rows": sampling_run.prefs.batch_size},
        "programs": list(entries.values()),
        "epochs": _epochs(sampling_run, sizes, entries, shapes),
        "fits": all(entry["fits"] for entry in entries.values()),
        "notes": [TIME_NOTE, LOOP_NOTE],
    }


def refusal_message(plan: dict[str, Any]) -> str:
    """One line naming every program that does not fit and its bytes."""
    parts = []
    for entry in plan["programs"]:
        if entry["fits"]:
            continue
        memory = entry.get("memory")
        if memory:
            detail = (f"needs {format_bytes(memory['total'])} per chip (arguments {format_bytes(memory['argument'])} + "
                      f"outputs {format_bytes(memory['output'])} - aliased {format_bytes(memory['alias'])} + temporaries "
                      f"{format_bytes(memory['temp'])}"
                      + (f" + resident {format_bytes(memory['resident'])}" if memory["resident"] else "") + ")")
        else:
            detail = entry["refusal"]
        parts.append(f"{entry['name']} {detail}")
    hbm = format_bytes(plan["slice"]["hbm_bytes"])
    return (f"{plan['config'] or plan['model']['path']} does not fit on {plan['slice']['name']} with mesh {plan['mesh']}: "
            + "; ".join(parts) + f"; a chip has {hbm} of HBM (change mesh, model.remat, batch sizes or --topology)")


def render_text(plan: dict[str, Any]) -> str:
    s, m = plan["slice"], plan["model"]
    lines = [
        f"plan: {plan['config']}",
        f"model: {m['path']} ({m['parameters'] / 1e9:.3f}B parameters, {m['dtype']} compute, remat {m['remat']}); "
        f"architecture from {m['architecture']}",
        f"slice: {s['name']} = {s['chips']} chips on {s['hosts']} host(s), topology {s['topology']}, {s['device_view']}; "
        f"per chip {format_bytes(s['hbm_bytes'])} HBM, {s['peak_flops'] / 1e12:.0f} TFLOP/s bf16, "
        f"{s['hbm_bandwidth'] / 1e9:.0f} GB/s",
        f"mesh: {plan['mesh']}",
        f"assumed: {plan['assumptions']['shapes_text']}",
        f"epoch: {plan['assumptions']['epoch']}",
        "",
        f"{'program':<12} {'fits':<4} {'per chip':>10} {'args':>10} {'outputs':>10} {'aliased':>10} {'temps':>10} "
        f"{'resident':>10} {'TFLOPs':>8} {'GB moved':>9} {'time >=':>10} {'compile':>8}  shapes",
    ]
    for p in plan["programs"]:
        memory = p.get("memory") or {}
        cell = lambda key: format_bytes(memory[key]) if key in memory else "-"  # noqa: E731
        flops = f"{p['flops'] / 1e12:.2f}" if "flops" in p else "-"
        moved = f"{p['bytes_accessed'] / 1e9:.1f}" if "bytes_accessed" in p else "-"
        time_cell = f"{format_seconds(p['seconds'])}" if p.get("seconds") is not None else "-"
        compile_cell = (f"{p['compile_seconds']:.0f} s" + ("*" if p.get("kept_from_earlier_plan") else "")
                        if "compile_seconds" in p else "-")
        need = format_bytes(p["need_bytes"]) if p.get("need_bytes") is not None else "-"
        lines.append(f"{p['name']:<12} {'yes' if p['fits'] else 'NO':<4} {need:>10} "
                     f"{cell('argument'):>10} {cell('output'):>10} {cell('alias'):>10} {cell('temp'):>10} "
                     f"{cell('resident'):>10} {flops:>8} {moved:>9} {time_cell:>10} {compile_cell:>8}  {p['shapes']}")
        if p.get("refusal"):
            lines.append(f"{'':<12} refused: {p['refusal']}")
    lines += ["", f"{'stage':<11} {'items':>8} {'per step':>9} {'steps':>7} {'step >=':>10} {'epoch >=':>10}  note"]
    for e in plan["epochs"]:
        step = format_seconds(e["step_seconds"]) if e.get("step_seconds") is not None else "-"
        epoch = format_seconds(e["epoch_seconds"]) if "epoch_seconds" in e else "-"
        items = f"{e['items']:,}" if e.get("items") is not None else "-"
        lines.append(f"{e['stage']:<11} {items:>8} {e['items_per_step']:>9} {e.get('steps', '-'):>7} {step:>10} "
                     f"{epoch:>10}  {e['note']}" + (f"; config runs {e['epochs']} epochs" if e["epochs"] > 1 else ""))
    if any(p.get("kept_from_earlier_plan") for p in plan["programs"]):
        lines += ["", f"*: the compiler's figures kept from an earlier plan of the same programs, not compiled "
                      f"again ({CACHE_SWITCH_ENV}=0 compiles them)"]
    lines += ["", *(f"note: {note}" for note in plan["notes"]),
              f"result: {'every program fits' if plan['fits'] else 'DOES NOT FIT'} on {s['name']}"]
    return "\n".join(lines)
