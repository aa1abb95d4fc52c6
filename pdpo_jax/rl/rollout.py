"""One rollout of PPO: responses sampled from the policy for a batch of prompts, laid out as
per-turn rows `[prompt | response]` for scoring and training.

A response's tokens are the sampled ones up to and including the stop that ended them (an EOS id
or the template's end of turn), so the policy is trained on where it stopped; one that ran out of
`max_new_tokens` keeps them all. Its text, cut before the stop, is what the reward reads.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pdpo_jax.data import PromptEncoder, TokenizedExample, per_turn_batch, with_scored_positions
from pdpo_jax.generation import Sampler, decode_response, generate, split_at_stop, stop_sequences
from pdpo_jax.model import Model, pad_id
from pdpo_jax.rl.prompts import RLPrompt


@dataclass(frozen=True)
class Rollout:
    batch: dict[str, np.ndarray]  # per-turn layout rows with `scored_positions`; filler rows are padding
    personas: list[tuple[str, ...]]  # of the real rows, in row order
    responses: list[str]  # the real rows' response texts
    stopped: np.ndarray  # bool [real rows]: the response ended before max_new_tokens
    real: np.ndarray  # bool [rows]: the row answers a prompt (not filler)


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of rollout `step`: fixed by (seed, step), so a resumed run samples alike."""
    digest = hashlib.sha256(f"pdpo-rl\x00{seed}\x00{step}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


def sample_rollout(policy: Model, encoder: PromptEncoder, prompt_batch: dict[str, np.ndarray], prompts: list[RLPrompt],
                   *, max_new_tokens: int, sampler: Sampler, seed: int, length_bucket: int, mesh: Any = None) -> Rollout:
    """Samples every row of `prompt_batch` (a `PromptBatches` batch over `prompts`) and lays the
    real rows out for scoring."""
    tokens = generate(policy, prompt_batch["prompt_ids"], prompt_batch["segment_ids"], max_new_tokens=max_new_tokens,
                      sampler=sampler, seed=seed, mesh=mesh)
    stops = stop_sequences(policy, encoder)
    real = prompt_batch["prompt_index"] >= 0
    rows: list[TokenizedExample | None] = []
    personas, responses, stopped = [], [], []
    for row, index in enumerate(prompt_batch["prompt_index"]):
        if index < 0:
            rows.append(None)
            continue
        prompt = prompts[int(index)]
        kept, stop = split_at_stop(tokens[row], stops)
        rows.append(TokenizedExample(prompt.example_id, prompt.prompt_ids, tuple(kept + stop)))
        personas.append(prompt.persona)
        responses.append(decode_response(policy.tokenizer, kept))
        stopped.append(bool(stop))
    batch = with_scored_positions(per_turn_batch(rows, pad_id=pad_id(policy), bucket=length_bucket))
    return Rollout(batch, personas, responses, np.asarray(stopped, bool), real)
