"""Continuous batching on the jitted decoder: a fixed number of KV-cache slots, a step for the busy ones.

The engine holds `slots` rows of KV cache, each `cache_length` columns long, as a stack of
batch-1 caches (every leaf gets a leading slot axis, the write index is one per slot), so each
slot fills its row at its own pace. Four jitted programs touch them:

    admit   one prompt, left-aligned to its bucket width exactly as `pdpo_jax.generate` lays it
            out, prefilled into a batch-1 cache that then replaces one slot's row; one compile per
            prompt bucket (`pdpo_jax.generation.decode.bucket_width`). The prefill is kept in the
            prompt cache (`pdpo_jax.serve.prompt_cache`)
    restore a prompt prefilled before: its kept prefill written into a slot's row as admit writes
            it, without running the model; one compile per prompt bucket
    decode  R slots (the busy ones, padded with idle ones to a power of two): pick each one's next
            token from the logits it holds (greedy, or temperature + top-p with the slot's own
            seed), gather their rows' first V columns (V a power of two holding every busy
            slot's tokens) into one batch-R cache whose rows each write at their own column,
            and run one decode step over it; one compile per (R, V)
    commit  the new column of each busy row, its logits and counters written into the state in
            place (donated); apart from decode because one program that both reads the cache
            through the gathered view and writes it made XLA copy the whole cache every step

A slot's computation never reads another slot's row, so a request's tokens do not depend on its
neighbours. The host reads back one small array per step (each row's token and log-probabilities);
everything else stays on device. Idle padding rows are computed and dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from pdpo_jax.generation.decode import (
    MIN_PROMPT_BUCKET,
    bucket_width,
    compute_params,
    decode_step,
    left_align,
    params_on,
    prefill,
    replicated_tokens,
)
from pdpo_jax.generation.sampling import (
    NUCLEUS_CANDIDATES,
    first_argmax,
    inverse_cdf_draw,
    nucleus_threshold,
    ranked_nucleus,
)
from pdpo_jax.model import Model, init_cache, pad_id
from pdpo_jax.model.family import family_for
from pdpo_jax.parallel import BATCH_AXES, fit_spec, replicated
from pdpo_jax.serve.programs import ProgramTable
from pdpo_jax.serve.prompt_cache import Prefilled, PromptCache

MIN_VIEW = 64  # fewest cache columns a step attends over
TOP_LOGPROBS = 5  # most alternatives a response reports per token (the OpenAI completions limit)
DEFAULT_PROMPT_CACHE_MIB = 256  # prefilled prompts kept for reuse (`pdpo_jax.serve.prompt_cache`)


def _spec_of(leaf: jax.Array) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)


def cache_length_for(max_model_len: int) -> int:
    """Columns of a slot's cache: room for any prompt of at most `max_model_len` tokens, padded to
    its bucket (under 1/4 more, at least MIN_PROMPT_BUCKET), plus its new tokens up to `max_model_len`."""
    return int(max_model_len) + max(MIN_PROMPT_BUCKET, int(max_model_len) // 4)


@dataclass(frozen=True)
class SlotRequest:
    """What the engine needs of a request: its prompt ids and how to pick its tokens."""

    prompt_ids: tuple[int, ...]
    temperature: float = 0.0  # 0: greedy (the first argmax)
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int = 0  # alternatives wanted per token, 0..TOP_LOGPROBS


@dataclass(frozen=True)
class StepResult:
    """One step's picks, read back to the host: `[slots]` arrays, and `[slots, TOP_LOGPROBS]` ones
    (filled only when some busy slot asked for alternatives)."""

    tokens: np.ndarray
    logprobs: np.ndarray
    top_ids: np.ndarray
    top_logprobs: np.ndarray


# ----------------------------------------------------------------------------- the jitted programs


def stacked_cache(config, slots: int, length: int) -> dict:
    """`slots` empty batch-1 caches stacked on a leading axis (the write index one per slot)."""
    one = init_cache(config, 1, length, dtype=jnp.dtype(config.dtype))
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (slots, *leaf.shape)), one)


def pad_sequence_axis(cache: dict, length: int) -> dict:
    """A batch-1 cache of W columns widened to `length` with empty columns (segment id 0)."""

    def pad(leaf, axis):
        widths = [(0, 0)] * leaf.ndim
        widths[axis] = (0, length - leaf.shape[axis])
        return jnp.pad(leaf, widths)

    padded = {key: pad(cache[key], -1) for key in ("positions", "segment_ids", "branch_ids")}
    for key in ("k", "v"):  # [..., kv_heads, W, head_dim], a list per layer or one stacked array
        padded[key] = jax.tree.map(lambda leaf: pad(leaf, -2), cache[key])
    return {**padded, "index": cache["index"]}


def cache_layout(tree: Any, mesh: Mesh, leading: tuple = ()) -> Any:
    """Shardings for a tree of cache arrays (or their shapes) on `mesh`: the first axes as `leading`
    says, a key or value leaf's kv heads (`[..., kv_heads, length, head_dim]`) over "tensor", the
    rest on every device; an axis that does not divide is replicated."""

    def sharding(path, leaf):
        names = [getattr(p, "key", None) for p in path]
        axes = list(leading)
        if ("k" in names or "v" in names) and leaf.ndim >= len(leading) + 4:  # (layers,) 1, kv_heads, length, head_dim
            axes += [None] * (leaf.ndim - 3 - len(leading)) + ["tensor"]
        return NamedSharding(mesh, fit_spec(PartitionSpec(*axes), leaf.shape, mesh))

    return jax.tree_util.tree_map_with_path(sharding, tree)


def _put_row(stack: Any, row: Any, slot: jax.Array) -> Any:
    return jax.tree.map(lambda big, one: jax.lax.dynamic_update_index_in_dim(big, one.astype(big.dtype), slot, 0),
                        stack, row)


def _prefill_row(params, prompt_ids, prompt_valid, *, config):
    """One left-aligned prompt `[1, W]` prefilled: its batch-1 cache of W columns and next-token logits `[vocab]`."""
    cache = init_cache(config, 1, prompt_ids.shape[1], dtype=jnp.dtype(config.dtype))
    logits, cache = prefill(params, prompt_ids, prompt_valid, cache, config=config)
    return cache, logits[0]


def _place(state, prefilled, logits, length, slot, settings):
    """`state` with slot `slot` holding a prefilled prompt of `length` tokens and its settings: what
    `_admit` does after its prefill, and on its own restores a kept prefill."""
    row = pad_sequence_axis(prefilled, state["cache"]["segment_ids"].shape[-1])
    temperature, top_p, seed, want_top = settings
    return {
        "cache": _put_row(state["cache"], row, slot),
        "logits": jax.lax.dynamic_update_index_in_dim(state["logits"], logits, slot, 0),
        "position": state["position"].at[slot].set(length),
        "picked": state["picked"].at[slot].set(0),
        "temperature": state["temperature"].at[slot].set(temperature),
        "top_p": state["top_p"].at[slot].set(top_p),
        "seed": state["seed"].at[slot].set(seed),
        "want_top": state["want_top"].at[slot].set(want_top),
    }


def _admit(params, state, prompt_ids, prompt_valid, slot, settings, *, config):
    """Prefills one left-aligned prompt `[1, W]` into slot `slot`'s row; also returns the prefill
    (cache and logits) for the prompt cache."""
    cache, logits = _prefill_row(params, prompt_ids, prompt_valid, config=config)
    length = jnp.sum(prompt_valid).astype(jnp.int32)
    return _place(state, cache, logits, length, slot, settings), (cache, logits)


def sampled_tokens(logits, temperature, top_p, keys):
    """Temperature + nucleus draw per row, each row with its own settings and key.

    A row's nucleus is every token at least as likely as its least likely member. That bound is
    read off the NUCLEUS_CANDIDATES most likely tokens when they hold `top_p` (as `TopP` does on
    CPU), else found over the whole vocabulary by bisection; either way the draw is made over the
    vocabulary in id order, so a row's token depends on its own logits, settings and key only.
    """
    probs = jax.nn.softmax(logits / jnp.maximum(temperature, 1e-6)[:, None], axis=-1)
    p = top_p[:, None]
    top_probs, _ = jax.lax.top_k(probs, min(NUCLEUS_CANDIDATES, probs.shape[-1]))
    kept = ranked_nucleus(top_probs, p)
    from_candidates = jnp.min(jnp.where(kept > 0, top_probs, jnp.inf), axis=-1, keepdims=True)
    candidates_hold_p = jnp.sum(top_probs, axis=-1, keepdims=True) >= p
    bound = jax.lax.cond(jnp.all(candidates_hold_p), lambda: from_candidates,
                         lambda: jnp.where(candidates_hold_p, from_candidates, nucleus_threshold(probs, p)))
    weights = jnp.where(probs >= bound, probs, 0.0)
    return jax.vmap(lambda w, key: inverse_cdf_draw(w[None], key)[0])(weights, keys)


def pick_tokens(logits, temperature, top_p, seed, picked):
    """Each slot's next token: the first argmax where its temperature is 0 (as `Greedy` picks),
    else a draw keyed by (its seed, how many tokens it has picked)."""
    greedy = first_argmax(logits)
    keys = jax.vmap(lambda s, n: jax.random.fold_in(jax.random.PRNGKey(s), n))(seed, picked)
    sampling = temperature > 0
    drawn = jax.lax.cond(jnp.any(sampling), lambda: sampled_tokens(logits, temperature, top_p, keys),
                         lambda: greedy)
    return jnp.where(sampling, drawn, greedy)


def token_logprobs(logits, tokens, want_top):
    """log p(token) per row, and the TOP_LOGPROBS best alternatives when any row wants them."""
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    rows = logits.shape[0]

    def top():
        values, ids = jax.lax.top_k(logprobs, TOP_LOGPROBS)
        return ids.astype(jnp.int32), values

    def none():
        return jnp.zeros((rows, TOP_LOGPROBS), jnp.int32), jnp.zeros((rows, TOP_LOGPROBS), jnp.float32)

    top_ids, top_values = jax.lax.cond(jnp.any(want_top), top, none)
    return chosen, top_ids, top_values


def gathered_view(cache: dict, rows: jax.Array, columns: int) -> dict:
    """Slots `rows`' caches, their first `columns` columns, as one cache of batch R that the model
    decodes in one call (each row keeps its own write index, `index` `[R]`): keys and values
    `[R, kv_heads, columns, head_dim]` per layer (`[layers, R, ...]` when stacked)."""
    view = {key: cache[key][rows][:, 0, :columns] for key in ("positions", "segment_ids", "branch_ids")}
    for key in ("k", "v"):  # a slot's [(layers,) 1, kv_heads, length, head_dim]
        view[key] = jax.tree.map(lambda leaf: jnp.moveaxis(leaf[rows][..., 0, :, :columns, :], 0, -4), cache[key])
    return {**view, "index": cache["index"][rows]}


def new_columns(view: dict, index: jax.Array) -> dict:
    """Row i's column `index[i]` of every leaf of the batch-R `view` (the column a step wrote), laid
    out as `_commit` writes it into the slots' caches: `[R, 1]` ids, `[R, (layers,) 1, kv_heads, head_dim]`."""
    columns = {key: jnp.take_along_axis(view[key], index[:, None], axis=1)
               for key in ("positions", "segment_ids", "branch_ids")}

    def take(part):  # [(layers,) R, kv_heads, columns, head_dim] -> [R, (layers,) 1, kv_heads, head_dim]
        rows_first = jnp.moveaxis(part, -4, 0)
        picked = jax.vmap(lambda row, at: jax.lax.dynamic_index_in_dim(row, at, axis=-2, keepdims=False))(rows_first, index)
        return jnp.expand_dims(picked, -3)

    for key in ("k", "v"):
        columns[key] = jax.tree.map(take, view[key])
    return columns


def _decode_rows(params, state, rows, active, *, config, columns, mesh=None):
    """Slots `rows` (`[R]`, distinct) pick their next token and run it through the model as one
    batch; those not `active` (padding up to R) are computed and then dropped. Attention reads only
    the first `columns` columns of the cache, which hold every active slot's tokens. Returns what
    `_commit` writes back, and the picks."""
    logits = state["logits"][rows]
    tokens = pick_tokens(logits, state["temperature"][rows], state["top_p"][rows], state["seed"][rows],
                         state["picked"][rows])
    chosen, top_ids, top_values = token_logprobs(logits, tokens, state["want_top"][rows] & active)
    position = jnp.where(active, state["position"][rows], 0)
    before = gathered_view(state["cache"], rows, columns)
    logits, after = decode_step(params, tokens, position, before, config=config)
    update = {"columns": new_columns(after, before["index"]), "index": before["index"], "logits": logits}
    picks = tuple(replicated_tokens(pick, mesh) for pick in (tokens, chosen, top_ids, top_values))  # every host reads them
    return update, picks


def _commit(state, rows, active, update):
    """`state` with the active rows' new cache columns, next-token logits and counters written in
    place (the state is donated). Kept apart from `_decode_rows`: a program that both reads the
    cache through a view and writes it made XLA copy the whole cache every step."""
    rows = jnp.where(active, rows, state["position"].shape[0])  # padding rows: an out-of-range slot, dropped
    index = update["index"]

    def put(full, column, axis):
        where = (rows, *[slice(None)] * (full.ndim + axis - 1), index)  # slot, the axes between, column
        return full.at[where].set(column.astype(full.dtype), mode="drop")

    cache, written = state["cache"], update["columns"]
    new_cache = {key: put(cache[key], written[key], -1) for key in ("positions", "segment_ids", "branch_ids")}
    for key in ("k", "v"):
        new_cache[key] = jax.tree.map(lambda full, column: put(full, column, -2), cache[key], written[key])
    new_cache["index"] = cache["index"].at[rows].add(1, mode="drop")
    return {
        **state,
        "cache": new_cache,
        "logits": state["logits"].at[rows].set(update["logits"], mode="drop"),
        "position": state["position"].at[rows].add(1, mode="drop"),
        "picked": state["picked"].at[rows].add(1, mode="drop"),
    }


# ----------------------------------------------------------------------------- the engine


class PromptTooLong(ValueError):
    """A prompt plus its token budget that does not fit a slot."""


class SlotEngine:
    """`slots` KV-cache rows of `max_model_len` tokens (prompt + new tokens) on the model's devices.

    `admit(slot, request)` prefills a request into a free slot; `step(busy)` advances every busy
    slot by one token and returns what each picked. The caller owns which slot is whose.

    Programs are compiled per shape (`pdpo_jax.serve.programs`). With `compile_ahead`, a step whose
    exact (rows, view) is not compiled yet runs at the smallest compiled shape that covers it (more
    rows, more columns: the same tokens) while the exact one compiles on a background thread, so
    serving stalls on a compile only when nothing compiled covers the step; `warm_up()` queues every
    shape at once.
    """

    def __init__(self, model: Model, *, slots: int, max_model_len: int, mesh: Mesh | None = None,
                 compile_ahead: bool = True, prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_MIB << 20):
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        config = model.config
        positions = int(config.max_position_embeddings)
        if family_for(config).learned_positions and max_model_len > positions:
            raise ValueError(f"max_model_len {max_model_len} exceeds the model's {positions} learned positions")
        self.model, self.config, self.slots, self.mesh = model, config, int(slots), mesh
        self.max_model_len = int(max_model_len)
        self.cache_length = cache_length_for(max_model_len)
        self.pad_id = pad_id(model)
        self.compile_ahead = bool(compile_ahead)
        self.params = jax.jit(partial(compute_params, config=config))(params_on(model, mesh))
        self.state = self._placed(self._empty_state())
        self._params_spec, self._state_spec = (jax.tree.map(_spec_of, tree) for tree in (self.params, self.state))
        # the state comes back laid out as it went in, as a compiled program takes it next time
        state_layout = None if mesh is None else jax.tree.map(lambda leaf: leaf.sharding, self.state)
        # a kept prefill: kv heads over "tensor" as in the slots, the rest on every device (one
        # prompt has no batch to split); the same for every prompt width
        self._prefill_layout = None if mesh is None else cache_layout(self._prefill_shapes(MIN_PROMPT_BUCKET), mesh)
        self._admit = jax.jit(partial(_admit, config=config), donate_argnums=(1,),
                              out_shardings=None if mesh is None else (state_layout, self._prefill_layout))
        self._restore = jax.jit(_place, donate_argnums=(0,), out_shardings=state_layout)
        self._decode_rows = jax.jit(partial(_decode_rows, config=config, mesh=mesh), static_argnames=("columns",))
        self._commit = jax.jit(_commit, donate_argnums=(0,), out_shardings=state_layout)
        self.admits = ProgramTable("prefill", self._compile_admit)  # by prompt width
        self.restores = ProgramTable("restore", self._compile_restore)  # by prompt width
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.steps = ProgramTable("step", self._compile_step)  # by (rows, cache columns)
        self.commits = ProgramTable("commit", self._compile_commit)  # by rows
        self.write_index = np.zeros(self.slots, np.int64)  # where each slot writes its next token

    # ------------------------------------------------------------------ shapes and their programs

    def step_row_counts(self) -> list[int]:
        """Every number of rows a step runs: powers of two below `slots`, and `slots`."""
        return sorted({min(1 << n, self.slots) for n in range(self.slots.bit_length() + 1)})

    def step_views(self) -> list[int]:
        """Every cache view a step attends over: powers of two from MIN_VIEW below the cache, and the cache."""
        views, columns = set(), MIN_VIEW
        while columns < self.cache_length:
            views.add(columns)
            columns *= 2
        return sorted(views | {self.cache_length})

    def prompt_widths(self) -> list[int]:
        """Every width a prompt that fits (at most max_model_len - 1 tokens) is prefilled at."""
        return sorted({bucket_width(n) for n in range(1, self.max_model_len)})

    def step_shapes(self) -> list[tuple[int, int]]:
        return [(rows, columns) for columns in self.step_views() for rows in self.step_row_counts()]

    def warm_up(self) -> None:
        """Queues every step shape, its commit and every prompt width for the background compiler
        (`pending_compiles()` counts what is left); serving goes on meanwhile."""
        self.commits.compile_ahead(self.step_row_counts())
        self.steps.compile_ahead(self.step_shapes())
        self.admits.compile_ahead(self.prompt_widths())
        if self.prompt_cache.budget_bytes:
            self.restores.compile_ahead(self.prompt_widths())

    def _tables(self) -> tuple[ProgramTable, ...]:
        return self.admits, self.restores, self.steps, self.commits

    def pending_compiles(self) -> int:
        return sum(table.pending() for table in self._tables())

    def cancel_compiles(self) -> None:
        """Drops the compiles still queued (one under way finishes on its thread)."""
        for table in self._tables():
            table.close()

    @property
    def widths_compiled(self) -> set[int]:
        return self.admits.ready()

    @property
    def step_shapes_compiled(self) -> set[tuple[int, int]]:
        """The (rows, cache columns) step programs compiled."""
        return self.steps.ready()

    def _replicated(self):
        return None if self.mesh is None else replicated(self.mesh)

    def _host_spec(self, shape: tuple[int, ...], dtype) -> jax.ShapeDtypeStruct:
        """An argument that comes from the host: on every device of the mesh (as `_from_host` puts it)."""
        return jax.ShapeDtypeStruct(shape, dtype, sharding=self._replicated())

    def _from_host(self, tree: Any) -> Any:
        """Host values as a compiled program takes them: on a mesh, copied to every device."""
        return tree if self.mesh is None else jax.device_put(tree, self._replicated())

    def _rows_spec(self, rows: int) -> tuple:
        return self._host_spec((rows,), jnp.int32), self._host_spec((rows,), jnp.bool_)

    def _step_outputs(self, rows: int) -> tuple[Any, Any]:
        """What a step of `rows` rows returns (the update, the picks), with its layout on the mesh:
        the update split by row over the batch axes, the picks on every device. Fixed, so that every
        step program hands its update to the commit program as that one was compiled to take it."""
        update, picks = jax.eval_shape(partial(self._decode_rows, columns=self.step_views()[0]), self._params_spec,
                                       self._state_spec, *self._rows_spec(rows))
        if self.mesh is None:
            return update, picks

        def by_row(leaf):
            spec = fit_spec(PartitionSpec(BATCH_AXES), leaf.shape, self.mesh)
            return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=NamedSharding(self.mesh, spec))

        return (jax.tree.map(by_row, update),
                jax.tree.map(lambda leaf: self._host_spec(leaf.shape, leaf.dtype), picks))

    def _compile_step(self, shape: tuple[int, int]):
        rows, columns = shape
        program = self._decode_rows
        if self.mesh is not None:
            layout = jax.tree.map(lambda leaf: leaf.sharding, self._step_outputs(rows))
            program = jax.jit(partial(_decode_rows, config=self.config, mesh=self.mesh), static_argnames=("columns",),
                              out_shardings=layout)
        return program.lower(self._params_spec, self._state_spec, *self._rows_spec(rows), columns=columns).compile()

    def _compile_commit(self, rows: int):
        update, _ = self._step_outputs(rows)
        return self._commit.lower(self._state_spec, *self._rows_spec(rows), update).compile()

    def _settings_spec(self) -> tuple:
        return tuple(self._host_spec((), dtype) for dtype in (jnp.float32, jnp.float32, jnp.uint32, jnp.bool_))

    def _compile_admit(self, width: int):
        prompt = self._host_spec((1, width), jnp.int32)
        return self._admit.lower(self._params_spec, self._state_spec, prompt, prompt, self._host_spec((), jnp.int32),
                                 self._settings_spec()).compile()

    def _prefill_shapes(self, width: int) -> Any:
        """What `_admit` hands the prompt cache for a prompt of this width: its cache and logits."""
        prompt = jax.ShapeDtypeStruct((1, width), jnp.int32)
        return jax.eval_shape(partial(_prefill_row, config=self.config), self._params_spec, prompt, prompt)

    def _prefill_spec(self, width: int) -> Any:
        """`_prefill_shapes`, laid out on the mesh as `_admit` lays them out."""
        shapes = self._prefill_shapes(width)
        if self.mesh is None:
            return shapes
        return jax.tree.map(lambda shape, where: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=where),
                            shapes, self._prefill_layout)

    def _compile_restore(self, width: int):
        cache, logits = self._prefill_spec(width)
        return self._restore.lower(self._state_spec, cache, logits, self._host_spec((), jnp.int32),
                                   self._host_spec((), jnp.int32), self._settings_spec()).compile()

    def _empty_state(self) -> dict:
        s = self.slots
        return {
            "cache": stacked_cache(self.config, s, self.cache_length),
            "logits": jnp.zeros((s, self.config.vocab_size), jnp.float32),
            "position": jnp.zeros((s,), jnp.int32),
            "picked": jnp.zeros((s,), jnp.int32),
            "temperature": jnp.zeros((s,), jnp.float32),
            "top_p": jnp.ones((s,), jnp.float32),
            "seed": jnp.zeros((s,), jnp.uint32),
            "want_top": jnp.zeros((s,), bool),
        }

    def _placed(self, state: dict) -> dict:
        """The state split over the mesh's batch axes by slot (kv heads over "tensor"); as it is without a mesh."""
        if self.mesh is None:
            return state

        def place(leaf, where):  # from the host, so a mesh spanning several hosts works alike
            host = np.asarray(leaf)
            return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

        return jax.tree.map(place, state, cache_layout(state, self.mesh, leading=(BATCH_AXES,)))

    def keepalive(self) -> None:
        """Nothing on one host (`pdpo_jax.serve.lockstep.LeaderEngine` tells the other hosts it is alive)."""

    @property
    def views_compiled(self) -> set[int]:
        """The distinct cache views (columns) of the step programs compiled."""
        return {columns for _, columns in self.step_shapes_compiled}

    def check_fits(self, prompt_length: int, max_new_tokens: int) -> None:
        """Raises PromptTooLong unless the prompt and `max_new_tokens` fit `max_model_len`."""
        if prompt_length < 1:
            raise PromptTooLong("the prompt is empty")
        if prompt_length + max_new_tokens > self.max_model_len:
            raise PromptTooLong(f"the prompt ({prompt_length} tokens) plus max_tokens ({max_new_tokens}) exceeds "
                                f"the context of {self.max_model_len} tokens")

    def admit(self, slot: int, request: SlotRequest) -> None:
        """Prefills `request`'s prompt into `slot` (free: its previous occupant is overwritten), or
        writes its kept prefill there when the same prompt was prefilled before."""
        prompt = tuple(int(t) for t in request.prompt_ids)
        width = self.prompt_width(len(prompt))
        settings = (np.float32(request.temperature), np.float32(request.top_p),
                    np.uint32(request.seed % 2**32), np.bool_(request.top_logprobs > 0))
        kept = self.prompt_cache.get(prompt)
        if kept is not None:
            program = self.restores.get(width)
            self.state = program(self.state, kept.cache, kept.logits,
                                 *self._from_host((np.int32(len(prompt)), np.int32(slot), settings)))
        else:
            ids = np.asarray(prompt, np.int32)[None]
            prompt_ids, prompt_valid = left_align(ids, np.ones_like(ids), self.pad_id)
            program = self.admits.get(width)
            self.state, (cache, logits) = program(
                self.params, self.state, *self._from_host((prompt_ids, prompt_valid, np.int32(slot), settings)))
            nbytes = sum(leaf.nbytes for leaf in jax.tree.leaves((cache, logits)))
            self.prompt_cache.put(prompt, Prefilled(cache, logits, nbytes))
        self.write_index[slot] = width

    def view_columns(self, busy: np.ndarray) -> int:
        """The cache columns a step attends over: the power of two (at least MIN_VIEW) that holds
        every busy slot's next token, at most the whole cache."""
        needed = int(self.write_index[busy].max(initial=0)) + 1
        columns = max(MIN_VIEW, 1 << (needed - 1).bit_length())
        return min(columns, self.cache_length)

    def row_count(self, busy: np.ndarray) -> int:
        """The rows a step over `busy` needs: the busy count rounded up to a power of two, at most `slots`."""
        return min(1 << (max(int(busy.sum()), 1) - 1).bit_length(), self.slots)

    def step_shape(self, busy: np.ndarray) -> tuple[int, int]:
        """The (rows, cache columns) a step over `busy` runs at: the shape it needs, or with
        `compile_ahead`, while that one is not compiled, the smallest compiled one that covers it
        (the needed shape is queued for the background compiler)."""
        busy = np.asarray(busy, bool)
        needed = (self.row_count(busy), self.view_columns(busy))
        if not self.compile_ahead or (self.steps.is_ready(needed) and self.commits.is_ready(needed[0])):
            return needed
        self.commits.compile_ahead([needed[0]])
        self.steps.compile_ahead([needed])
        covering = [shape for shape in self.step_shapes_compiled
                    if shape[0] >= needed[0] and shape[1] >= needed[1] and self.commits.is_ready(shape[0])]
        return min(covering, key=lambda shape: (shape[0] * shape[1], shape), default=needed)

    def step_rows(self, busy: np.ndarray, count: int | None = None) -> np.ndarray:
        """The slots a step runs: the busy ones, then idle ones up to `count` (default: `row_count`)."""
        count = self.row_count(busy) if count is None else count
        return np.concatenate([np.flatnonzero(busy), np.flatnonzero(~busy)])[:count].astype(np.int32)

    def step(self, busy: np.ndarray, shape: tuple[int, int] | None = None) -> StepResult:
        """One token for every busy slot (`busy`: `[slots]` bool) at `shape` (rows, cache columns;
        default `step_shape(busy)`); the result has a row per slot, those of idle slots meaningless."""
        busy = np.asarray(busy, bool)
        count, columns = self.step_shape(busy) if shape is None else shape
        rows = self.step_rows(busy, count)
        active = busy[rows]
        rows_in, active_in = self._from_host((rows, active))
        update, picks = self.steps.get((count, columns))(self.params, self.state, rows_in, active_in)
        self.state = self.commits.get(count)(self.state, rows_in, active_in, update)
        self.write_index[busy] += 1
        picked = [np.asarray(part) for part in jax.device_get(picks)]
        per_slot = []
        for part in picked:
            full = np.zeros((self.slots, *part.shape[1:]), part.dtype)
            full[rows] = part
            per_slot.append(full)
        return StepResult(*per_slot)

    def prompt_width(self, prompt_length: int) -> int:
        """The bucket a prompt of this length is prefilled at (one compile per distinct width)."""
        return bucket_width(prompt_length)
