"""Sampling nested prompts from one prefill: prompts that are token prefixes of each other share a
trunk, and every prompt then decodes on its own row.

A dialogue's generation prompts nest (turn t+1's prompt is turn t's prompt, the gold response, the
end of turn and the partner's next line; see data/packing.py). Consecutive prompts of which each is
a token prefix of the next form a group, and the group's last prompt is its trunk:

    trunk rows (one per group):  [prompt_T ............................]   prefilled once
    branch rows (one per prompt): the trunk's cache, slots at or after the prompt's own length
                                  emptied (segment 0), then its own sampled tokens

A branch's first-token logits are read from the trunk's hidden state at the last token of its own
prompt, and its decode sees exactly its prompt's keys and values at its prompt's positions, so
every prompt samples what `generate` samples on that prompt alone (up to fp32 summation order):
same seed, same rows, same draws. Only the prefill is shared; decoding is `decode.sample_tokens`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from pdpo_jax.generation.decode import (
    constrain,
    bucket_width,
    cache_shardings,
    check_new_tokens,
    compute_params,
    last_token_logits,
    params_on,
    replicated_tokens,
    sample_tokens,
)
from pdpo_jax.data.trees import is_token_prefix
from pdpo_jax.generation.sampling import Greedy, Sampler
from pdpo_jax.model import Decoder, Model, ModelConfig, eos_ids, init_cache, pad_id, unembedding
from pdpo_jax.parallel import place_batch, rows_for_mesh


def nested_groups(prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    """Indices of `prompts` in runs of consecutive prompts, each a token prefix of the next; the
    last prompt of a run holds all of them. A prompt that does not extend the one before starts
    the next run (another dialogue, another persona, or history dropped to fit the context)."""
    groups: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if groups and is_token_prefix(prompts[i - 1], prompt):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def next_power_of_two(count: int, most: int) -> int:
    """`count` rounded up to a power of two, at most `most`: the trunk rows of `count` groups,
    so that a run compiles a few shapes."""
    return min(1 << max(0, count - 1).bit_length(), most)


@dataclass(frozen=True)
class TreeLayout:
    """The arrays `_tree_decode` takes: right-padded trunks and, per decode row, its trunk and fork."""

    trunk_ids: np.ndarray  # int32 [trunks, width]
    trunk_valid: np.ndarray  # int32 [trunks, width], 1 on real tokens
    branch_trunk: np.ndarray  # int32 [rows]: the trunk row each decode row reads
    branch_length: np.ndarray  # int32 [rows]: its prompt's length, the slot (and position) it forks at


def tree_layout(prompts: Sequence[Sequence[int]], rows: int, pad: int, mesh: Mesh | None = None) -> TreeLayout:
    """`prompts` as trunks and branches. Decode rows past the prompts repeat the last prompt and
    trunk rows past the groups repeat the last trunk (fixed shapes; the filler changes no real row)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError(f"prompts must be non-empty; empty prompts: {[i for i, p in enumerate(prompts) if not p]}")
    if rows < len(prompts):
        raise ValueError(f"{len(prompts)} prompts do not fit {rows} decode rows")
    groups = nested_groups(prompts)
    trunks = [prompts[group[-1]] for group in groups]
    count = rows_for_mesh(next_power_of_two(len(trunks), rows), mesh)
    trunks += [trunks[-1]] * (count - len(trunks))
    width = bucket_width(max(len(t) for t in trunks))
    trunk_ids = np.full((count, width), pad, np.int32)
    trunk_valid = np.zeros((count, width), np.int32)
    for row, trunk in enumerate(trunks):
        trunk_ids[row, : len(trunk)] = trunk
        trunk_valid[row, : len(trunk)] = 1
    trunk_of = [g for g, group in enumerate(groups) for _ in group]
    trunk_of += [trunk_of[-1]] * (rows - len(prompts))
    lengths = [len(p) for p in prompts] + [len(prompts[-1])] * (rows - len(prompts))
    return TreeLayout(trunk_ids, trunk_valid, np.asarray(trunk_of, np.int32), np.asarray(lengths, np.int32))


def fork_cache(trunk_cache: dict, branch_trunk: jax.Array, branch_length: jax.Array, new_slots: int,
               config: ModelConfig) -> dict:
    """One cache row per branch: its trunk's keys and values, every slot at or after its fork
    emptied (segment 0, so nothing attends to the trunk's later tokens), then `new_slots` empty
    slots, written from the trunk width on."""
    width = trunk_cache["segment_ids"].shape[1]
    row_axis = 1 if config.scan_layers else 0

    def branch_rows(kv: jax.Array) -> jax.Array:  # [(layers,) trunks, kv_heads, width, head_dim]
        taken = jnp.take(kv, branch_trunk, axis=row_axis)
        return jnp.pad(taken, [(0, 0)] * (taken.ndim - 2) + [(0, new_slots), (0, 0)])

    def branch_ids(ids: jax.Array, keep: jax.Array | None = None) -> jax.Array:
        taken = ids[branch_trunk] if keep is None else jnp.where(keep, ids[branch_trunk], 0)
        return jnp.pad(taken, ((0, 0), (0, new_slots)))

    before_fork = jnp.arange(width)[None, :] < branch_length[:, None]
    k, v = trunk_cache["k"], trunk_cache["v"]
    return {
        "k": branch_rows(k) if config.scan_layers else [branch_rows(layer) for layer in k],
        "v": branch_rows(v) if config.scan_layers else [branch_rows(layer) for layer in v],
        "positions": branch_ids(trunk_cache["positions"]),
        "segment_ids": branch_ids(trunk_cache["segment_ids"], keep=before_fork),
        "branch_ids": branch_ids(trunk_cache["branch_ids"]),
        "index": jnp.asarray(width, jnp.int32),
    }


@partial(jax.jit, static_argnames=("config", "max_new_tokens", "sampler", "eos_ids", "pad_id", "mesh"))
def _tree_decode(params, trunk_ids, trunk_valid, branch_trunk, branch_length, key, *, config: ModelConfig,
                 max_new_tokens: int, sampler: Sampler, eos_ids: tuple[int, ...], pad_id: int,
                 mesh: Mesh | None = None):
    """Sampled tokens `[rows, max_new_tokens]` of every branch, the pad id after its end of sequence."""
    trunks, width = trunk_ids.shape
    rows = branch_trunk.shape[0]
    params = compute_params(params, config)
    dtype = jnp.dtype(config.dtype)
    trunk_shardings = None if mesh is None else cache_shardings(config, mesh, trunks, width)
    trunk_cache = constrain(init_cache(config, trunks, width, dtype=dtype), trunk_shardings)
    # Right-padded: positions are the column index; padding gets 0 (a learned-position table may
    # end before the bucketed width, and padding is masked out anyway).
    positions = jnp.where(trunk_valid == 1, jnp.arange(width, dtype=jnp.int32)[None, :], 0)
    hidden, trunk_cache = Decoder(config).apply({"params": params}, trunk_ids, positions, trunk_valid,
                                                cache=trunk_cache, return_hidden=True)
    fork_hidden = hidden[branch_trunk, branch_length - 1]  # each branch's last prompt token
    logits = last_token_logits(fork_hidden, unembedding(params, config).astype(jnp.float32))
    shardings = None if mesh is None else cache_shardings(config, mesh, rows, width + max_new_tokens)
    cache = constrain(fork_cache(trunk_cache, branch_trunk, branch_length, max_new_tokens, config), shardings)
    tokens = sample_tokens(params, logits, cache, branch_length, key, config=config, max_new_tokens=max_new_tokens,
                           sampler=sampler, eos_ids=eos_ids, pad_id=pad_id, cache_shardings=shardings)
    return replicated_tokens(tokens, mesh)


def generate_tree(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                  sampler: Sampler | None = None, seed: int = 0, rows: int | None = None,
                  mesh: Mesh | None = None) -> np.ndarray:
    """New token ids `[len(prompts), max_new_tokens]` after each prompt (token id lists), padded
    with the pad id after EOS: what `generate` gives for the same prompts in `rows` rows with the
    same seed, with one prefill per group of nesting prompts instead of one per prompt.

    `rows` (default `len(prompts)`) fixes the decode batch; on `mesh` it and the trunk rows are
    rounded up to split over the batch axes, parameters are placed by the partition rules, and
    every process passes every prompt and gets every row back.
    """
    rows = rows_for_mesh(max(rows or len(prompts), len(prompts)), mesh)
    check_new_tokens(model, max(len(p) for p in prompts) if prompts else 0, max_new_tokens)
    layout = tree_layout(prompts, rows, pad_id(model), mesh)
    arrays = (layout.trunk_ids, layout.trunk_valid, layout.branch_trunk, layout.branch_length)
    if mesh is not None:  # trunk rows and decode rows both split over the batch axes
        arrays = place_batch(arrays, mesh)
    tokens = _tree_decode(params_on(model, mesh), *map(jnp.asarray, arrays), jax.random.PRNGKey(seed),
                          config=model.config, max_new_tokens=int(max_new_tokens), sampler=sampler or Greedy(),
                          eos_ids=eos_ids(model), pad_id=pad_id(model), mesh=mesh)
    return np.asarray(tokens)[: len(prompts)]
