"""The programs a run executes, as the stages jit them, with abstract inputs of the config's shapes.

Each `Program` pairs a jitted function with `jax.ShapeDtypeStruct` arguments that carry the
shardings a run gives them on the mesh, so `program.jitted.lower(*program.args).compile()` builds
the very executable a run would, for any backend whose devices the mesh holds (TPU devices from a
compile-only topology included). Nothing is allocated.

    sft-step     jit_train_step(sft_objective): `[grad_accum, batch_size, length]` micro-batches
    dpo-step     jit_train_step(dpo_objective): one row per pair (shared prompt) or two
    prefill      the sampler's prompt pass into an empty KV cache (weights cast once, as it does)
    decode-step  one sampled token through the cache (weights already in the compute dtype)
    dnli-score   sequence_scores of `rows` examples x 31 candidates, as eval-dnli batches them

The train steps' cost is corrected for the compiler counting a loop body once: `outside` is the
part of the step outside the micro-batch loop (the optimizer update), compiled on its own. A
scanned layer stack (`model.scan_layers`) is such a loop too: its cost comes from the same program
built unrolled with one and with two layers (`layer_probes`), every layer costing the same; the
DNLI scorer's chunked vocabulary projection by the same scorer in one chunk (`cost_program`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pdpo_jax.config import RunConfig
from pdpo_jax.data.batching import BATCH_KEYS, SCORED_POSITIONS, bucketed_length, scored_width
from pdpo_jax.generation.decode import bucket_width, cache_shardings, compute_params, decode_step, prefill
from pdpo_jax.model import ModelConfig, init_cache
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.objectives import preference_settings
from pdpo_jax.parallel import BATCH_AXES, param_shardings, replicated
from pdpo_jax.scoring import LOGPROB_CHUNK, sequence_scores
from pdpo_jax.train.optim import make_optimizer
from pdpo_jax.train.steps import (abstract_train_state, dpo_objective, jit_train_step,
                                  micro_batch_sharding, sft_objective, state_shardings)

PROGRAMS = ("sft-step", "dpo-step", "prefill", "decode-step", "dnli-score")
DNLI_CANDIDATES = 31  # the paper's protocol: gold + the first 10 of each other category


@dataclass(frozen=True)
class Shapes:
    """The sizes that data decide in a real run (it pads to the longest item), fixed here as stated
    assumptions; every one can be overridden from the command line."""

    response_tokens: int = 64  # longest response scored in an SFT row or a DPO chosen, end-of-turn included
    dnli_rows: int = 8  # examples per eval-dnli call (its --batch-examples default)
    dnli_row_length: int = 1024  # prompt + 31 x (copied token + candidate), eval-dnli's 128-token buckets
    dnli_scored: int = 1024  # scored candidate tokens per DNLI row (31 candidates)

    def describe(self) -> str:
        return (f"longest scored response {self.response_tokens} tokens; DNLI {self.dnli_rows} rows x "
                f"{self.dnli_row_length} tokens with {self.dnli_scored} scored")


@dataclass(frozen=True)
class Program:
    name: str
    stage: str
    shapes: str  # what the arguments are, in words
    jitted: Any
    args: tuple
    resident_bytes: int = 0  # per chip, live beside the program (the fp32 weights while decoding)
    loop_trips: int = 1  # micro-batches of a train step
    outside: "Program | None" = None  # the step outside its micro-batch loop, for the cost count
    cost_program: "Program | None" = None  # the same math without a loop the compiler would count once
    layers: int = 0  # of the model, for the cost of a scanned stack
    layer_probes: "tuple[Program, Program] | None" = None  # the program unrolled with 1 and 2 layers
    extra: dict = field(default_factory=dict)


def _abstract(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        tree, shardings)


def per_chip_bytes(abstract_tree: Any) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += int(np.prod(shard, dtype=np.int64)) * jnp.dtype(leaf.dtype).itemsize
    return total


def abstract_params(config: ModelConfig, mesh: Mesh, dtype: Any = jnp.float32) -> Any:
    """The parameter tree as a run holds it on `mesh` (fp32, split by the partition rules)."""
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype), param_shapes(config))
    return _abstract(shapes, param_shardings(shapes, mesh))


def _micro_batches(accumulation: int, rows: int, length: int, scored: int, mesh: Mesh,
                   pairs: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
    sharding = micro_batch_sharding(mesh)
    batch = {key: jax.ShapeDtypeStruct((accumulation, rows, length), jnp.int32, sharding=sharding) for key in BATCH_KEYS}
    batch["loss_mask"] = jax.ShapeDtypeStruct((accumulation, rows, length), jnp.float32, sharding=sharding)
    batch[SCORED_POSITIONS] = jax.ShapeDtypeStruct((accumulation, rows, scored), jnp.int32, sharding=sharding)
    if pairs is not None:
        for key in ("ref_chosen_logps", "ref_rejected_logps", "pair_mask"):
            batch[key] = jax.ShapeDtypeStruct((accumulation, pairs), jnp.float32, sharding=sharding)
    return batch


def _update_program(name: str, optimizer: optax.GradientTransformation, state: Any, shardings: Any) -> Program:
    """What a train step does after its micro-batch loop: mean gradient, its norm, the update."""

    def update(state, grads, count):
        grads = jax.tree.map(lambda g: g / count.astype(g.dtype), grads)
        norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), opt_state, norm

    count = jax.ShapeDtypeStruct((), jnp.float32, sharding=shardings.step)
    jitted = jax.jit(update, out_shardings=(shardings.params, shardings.opt_state, shardings.step))
    return Program(f"{name} (update)", "", "", jitted, (state, state.params, count))


def _train_step(name: str, stage: str, objective: Callable, section: Any, config: ModelConfig, mesh: Mesh,
                rows: int, length: int, scored: int, pairs: int | None, what: str) -> Program:
    optimizer, _ = make_optimizer(section.optimizer, total_steps=1000)  # the schedule's length changes no shape
    params = abstract_params(config, mesh)
    shardings = state_shardings(params, optimizer, mesh)
    state = abstract_train_state(params, optimizer, shardings)
    batches = _micro_batches(section.grad_accum, rows, length, scored, mesh, pairs)
    return Program(name, stage, what, jit_train_step(objective, optimizer, mesh, shardings), (state, batches),
                   loop_trips=section.grad_accum, outside=_update_program(name, optimizer, state, shardings))


def sft_step(run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    length = bucketed_length(run.data.max_length, run.data.length_bucket)
    scored = scored_width(shapes.response_tokens, length)
    sft = run.sft
    what = f"{sft.grad_accum} x [{sft.batch_size}, {length}] micro-batches, {scored} scored positions per row"
    return _train_step("sft-step", "sft", functools.partial(sft_objective, config=config), sft, config, mesh,
                       sft.batch_size, length, scored, None, what)


def dpo_row_length(run: RunConfig) -> int:
    """The longest DPO row: a pair's prompt is cut so prompt + the longer response fit max_length;
    a shared row adds one copied token and the shorter response (a sample of at most
    max_new_tokens plus its end-of-turn token); a tree row is at most `dpo.tree_max_length`."""
    if run.dpo.layout == "tree":
        return bucketed_length(run.dpo.tree_max_length, run.data.length_bucket)
    if run.dpo.layout == "unshared":
        return bucketed_length(run.data.max_length, run.data.length_bucket)
    return bucketed_length(run.data.max_length + 1 + run.prefs.max_new_tokens + 1, run.data.length_bucket)


def dpo_step(run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    dpo = run.dpo
    length = dpo_row_length(run)
    rows = 2 * dpo.batch_size if dpo.layout == "unshared" else dpo.batch_size
    pairs = dpo.batch_size * dpo.tree_max_pairs if dpo.layout == "tree" else dpo.batch_size
    pair_tokens = shapes.response_tokens + run.prefs.max_new_tokens + 1
    scored = scored_width(pair_tokens * (dpo.tree_max_pairs if dpo.layout == "tree" else 1), length)
    settings = preference_settings(dpo.loss_type, **dpo.objective_settings())
    layout = {"shared": "[prompt | chosen | rejected] rows", "unshared": "a row per response",
              "tree": f"dialogue-tree rows of up to {dpo.tree_max_pairs} pairs"}[dpo.layout]
    what = f"{dpo.grad_accum} x [{rows}, {length}] micro-batches ({layout}), {scored} scored positions per row"
    return _train_step("dpo-step", "dpo", functools.partial(dpo_objective, config=config, settings=settings), dpo,
                       config, mesh, rows, length, scored, pairs, what)


def sampler_sizes(run: RunConfig) -> tuple[int, int, int]:
    """(rows, prompt width, cache length) of make-prefs' sampling: prompts fill up to max_length
    and are bucketed as the sampler does; the cache holds them plus max_new_tokens."""
    width = bucket_width(run.data.max_length)
    return run.prefs.batch_size, width, width + run.prefs.max_new_tokens


def _rows_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def _abstract_cache(config: ModelConfig, mesh: Mesh, rows: int, length: int) -> Any:
    cache = jax.eval_shape(lambda: init_cache(config, rows, length, dtype=jnp.dtype(config.dtype)))
    return _abstract(cache, cache_shardings(config, mesh, rows, length))


def prefill_program(run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    rows, width, length = sampler_sizes(run)
    params = abstract_params(config, mesh)
    cache = _abstract_cache(config, mesh, rows, length)
    ids = jax.ShapeDtypeStruct((rows, width), jnp.int32, sharding=_rows_sharding(mesh))

    def run_prefill(params, prompt_ids, prompt_valid, cache):
        return prefill(compute_params(params, config), prompt_ids, prompt_valid, cache, config=config)

    out = (_rows_sharding(mesh), jax.tree.map(lambda s: s.sharding, cache))
    jitted = jax.jit(run_prefill, out_shardings=out, donate_argnums=3)
    return Program("prefill", "make-prefs", f"[{rows}, {width}] prompts into a {length}-slot KV cache", jitted,
                   (params, ids, ids, cache))


def decode_program(run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    rows, _, length = sampler_sizes(run)
    params = abstract_params(config, mesh)
    compute = _abstract(jax.eval_shape(functools.partial(compute_params, config=config), params),
                        jax.tree.map(lambda s: s.sharding, params))
    cache = _abstract_cache(config, mesh, rows, length)
    token = jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=_rows_sharding(mesh))
    out = (_rows_sharding(mesh), jax.tree.map(lambda s: s.sharding, cache))
    jitted = jax.jit(functools.partial(decode_step, config=config), out_shardings=out, donate_argnums=3)
    return Program("decode-step", "make-prefs", f"[{rows}] tokens through a {length}-slot KV cache", jitted,
                   (compute, token, token, cache), resident_bytes=per_chip_bytes(params),
                   extra={"resident": "the fp32 weights, kept while the sampler runs on its compute-dtype copy"})


def dnli_program(run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    rows, length = shapes.dnli_rows, shapes.dnli_row_length
    scored = min(shapes.dnli_scored, length)
    params = abstract_params(config, mesh)
    sharding = _rows_sharding(mesh)
    batch = {key: jax.ShapeDtypeStruct((rows, length), jnp.int32, sharding=sharding) for key in BATCH_KEYS}
    batch["loss_mask"] = jax.ShapeDtypeStruct((rows, length), jnp.float32, sharding=sharding)
    batch[SCORED_POSITIONS] = jax.ShapeDtypeStruct((rows, scored), jnp.int32, sharding=sharding)
    num_sequences = rows * DNLI_CANDIDATES

    def scorer(chunk_size: int):
        def score(params, batch):
            return sequence_scores(params, config, batch, num_sequences, chunk_size)
        return jax.jit(score, out_shardings=replicated(mesh))

    what = f"[{rows}, {length}] rows of {DNLI_CANDIDATES} candidates, {scored} scored positions per row"
    # The vocabulary projection runs in chunks inside a loop; for the FLOP count, in one chunk.
    whole = Program("dnli-score", "eval-dnli", what, scorer(scored), (params, batch))
    return Program("dnli-score", "eval-dnli", what, scorer(LOGPROB_CHUNK), (params, batch), cost_program=whole)


BUILDERS: dict[str, Callable[[RunConfig, ModelConfig, Mesh, Shapes], Program]] = {
    "sft-step": sft_step, "dpo-step": dpo_step, "prefill": prefill_program, "decode-step": decode_program,
    "dnli-score": dnli_program,
}


def build_program(name: str, run: RunConfig, config: ModelConfig, mesh: Mesh, shapes: Shapes) -> Program:
    """The program `name` of `run`; for a scanned layer stack with the unrolled probes its cost needs."""
    program = BUILDERS[name](run, config, mesh, shapes)
    if not config.scan_layers:
        return program
    probes = tuple(BUILDERS[name](run, config.replace(scan_layers=False, num_layers=n), mesh, shapes) for n in (1, 2))
    return dataclasses.replace(program, layers=config.num_layers, layer_probes=probes)
