"""Conveniences for scripts and notebooks: the model's logits, a reply in character, and the
log-likelihood of candidate replies, each in one call. Exported at the package root.

They are thin: `forward_logits` is the decoder with positions from the mask, `respond_to` is
`PromptEncoder` + `generation.respond`, `score_responses` is the shared scorer on one
shared-prompt row. The stages use the same pieces directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from pdpo_jax.data import PromptEncoder, shared_prompt_batch, with_scored_positions
from pdpo_jax.data.templates import PromptTemplate
from pdpo_jax.errors import PdpoError
from pdpo_jax.generation import Response, Sampler, context_limit, respond
from pdpo_jax.model import Decoder, Model, ModelConfig, require_tokenizer
from pdpo_jax.scoring import make_scorer


@partial(jax.jit, static_argnames=("config",))
def _logits(params, input_ids, attention_mask, *, config: ModelConfig) -> jax.Array:
    mask = attention_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    logits, _ = Decoder(config).apply({"params": params}, input_ids, positions, mask)
    return logits


def forward_logits(model: Model, input_ids, attention_mask=None) -> np.ndarray:
    """fp32 logits `[batch, length, vocab]` of `input_ids` `[batch, length]`.

    `attention_mask` (1 = real token) may pad on either side: positions count real tokens only,
    so a left-padded row gives the same logits at its tokens as the unpadded one. Padding
    positions hold logits of no meaning.
    """
    input_ids = np.asarray(input_ids, np.int32)
    if input_ids.ndim != 2:
        raise PdpoError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if mask.shape != input_ids.shape:
        raise PdpoError(f"attention_mask {mask.shape} must match input_ids {input_ids.shape}")
    return np.asarray(_logits(model.params, input_ids, mask, config=model.config), np.float32)


def respond_to(model: Model, persona: Sequence[str], history: Sequence[str], *,
               template: str | dict | PromptTemplate = "chat-en", sampler: Sampler | None = None,
               max_new_tokens: int = 48, seed: int = 0, max_length: int | None = None) -> Response:
    """The model's next turn in character (greedy when `sampler` is None). `history` is oldest
    first and ends with the partner's line; the oldest turns go first when it does not fit."""
    encoder = PromptEncoder(require_tokenizer(model), template)
    kept = encoder.fit_history(persona, history, context_limit(model, max_length) - max_new_tokens)
    if kept is None:
        raise PdpoError(f"the persona alone leaves no room for {max_new_tokens} new tokens")
    prompt = encoder.prompt_ids(persona, kept)
    return respond(model, encoder, [prompt], max_new_tokens=max_new_tokens, sampler=sampler, seed=seed)[0]


def score_responses(model: Model, persona: Sequence[str], history: Sequence[str], responses: Sequence[str], *,
                    template: str | dict | PromptTemplate = "chat-en",
                    end_of_turn: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(summed log-probs, token counts) of each candidate reply to persona + history, both
    `[len(responses)]`: the ranking Dialogue-NLI evaluation and DPO's reference log-probs use."""
    if not responses:
        raise PdpoError("score_responses needs at least one response")
    encoder = PromptEncoder(require_tokenizer(model), template)
    prompt = encoder.prompt_ids(persona, history)
    candidates = [encoder.response_ids(text, end_of_turn=end_of_turn) for text in responses]
    if any(not ids for ids in candidates):
        raise PdpoError("a response encodes to no tokens; score it with end_of_turn=True")
    batch = with_scored_positions(shared_prompt_batch([prompt], [candidates]))
    return make_scorer(model, len(candidates))(batch)
