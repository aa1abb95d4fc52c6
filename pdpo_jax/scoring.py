"""Scoring sequences under a model: the log-probability of every target token of a layout batch,
summed per scored sequence.

One function serves every stage that scores: the SFT and DPO objectives, DPO's reference
log-probs (computed once by make-prefs) and Dialogue-NLI candidate ranking. `make_scorer` jits it
once for a model, on one device or on a mesh.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import numpy as np

from pdpo_jax.data.batching import SCORED_POSITIONS
from pdpo_jax.objectives import sequence_logprobs, token_logprobs_at, token_logprobs_from_hidden
from pdpo_jax.model import Decoder, Model, ModelConfig, unembedding
from pdpo_jax.parallel import place_batch, replicated

LOGPROB_CHUNK = 256  # positions per chunk of fp32 logits when scoring (bounds [B, chunk, V] memory)

Scorer = Callable[[dict[str, np.ndarray]], tuple[np.ndarray, np.ndarray]]
"""`batch -> (summed log-probs, token counts)` of every scored sequence, both `[num_sequences]` numpy."""


def token_logps(params: Any, config: ModelConfig, batch: dict[str, jax.Array],
                chunk_size: int = LOGPROB_CHUNK) -> jax.Array:
    """log p(targets) at every position of a layout batch, `[batch, length]` fp32.

    With `scored_positions` in the batch (see `pdpo_jax.data.with_scored_positions`) only those
    positions are projected onto the vocabulary and every other one reads 0: the same values
    wherever `loss_mask` is non-zero, for a fraction of the work when prompts are long.
    """
    return token_logps_and_hidden(params, config, batch, chunk_size)[0]


def token_logps_and_hidden(params: Any, config: ModelConfig, batch: dict[str, jax.Array],
                           chunk_size: int = LOGPROB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """`token_logps` and the final-norm hidden states `[batch, length, hidden]` they came from
    (what a value head on the same trunk reads)."""
    hidden, _ = Decoder(config).apply(
        {"params": params}, batch["input_ids"], batch["positions"], batch["segment_ids"],
        branch_ids=batch.get("branch_ids"), return_hidden=True,
    )
    kernel = unembedding(params, config).astype(hidden.dtype)
    if SCORED_POSITIONS in batch:
        logps = token_logprobs_at(hidden, kernel, batch["targets"], batch[SCORED_POSITIONS], chunk_size=chunk_size)
    else:
        logps = token_logprobs_from_hidden(hidden, kernel, batch["targets"], chunk_size=chunk_size)
    return logps, hidden


def sequence_scores(params: Any, config: ModelConfig, batch: dict[str, jax.Array],
                    num_sequences: int, chunk_size: int = LOGPROB_CHUNK) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs and token counts of every scored sequence, both `[num_sequences]`.

    Jit it with `config` and `num_sequences` static (or use `make_scorer`). `chunk_size` positions
    are projected onto the vocabulary at a time (the same values, less memory).
    """
    logps = token_logps(params, config, batch, chunk_size)
    return sequence_logprobs(logps, batch["loss_mask"], batch["sequence_ids"], num_sequences)


@functools.lru_cache(maxsize=64)
def _jitted_sequence_scores(config: ModelConfig, num_sequences: int, mesh: Any) -> Callable:
    """One jitted scorer per (architecture, sequence count, mesh), shared by every scorer made for
    it: two models of one architecture (SFT and DPO in a pipeline) or repeated `score_responses`
    calls compile once per batch shape."""

    def score(params, batch):
        return sequence_scores(params, config, batch, num_sequences)

    return jax.jit(score) if mesh is None else jax.jit(score, out_shardings=replicated(mesh))


def make_scorer(model: Model, num_sequences: int, mesh: Any = None) -> Scorer:
    """`sequence_scores` of `model`, jitted (one compile per batch shape). On a mesh every process
    passes the whole batch, each device takes its rows, and the parameters keep the shardings they
    were loaded with."""
    jitted = _jitted_sequence_scores(model.config, num_sequences, mesh)

    def run(batch: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        logps, counts = jitted(model.params, place_batch(batch, mesh))
        return np.asarray(logps), np.asarray(counts)

    return run
