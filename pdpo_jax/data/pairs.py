"""DPO batches: preference pairs as token ids, in a shared-prompt or a one-sequence-per-row layout.

Both layouts number chosen `2i` and rejected `2i + 1` and carry the same pair-level arrays, so one
DPO objective consumes either and gets the same log-probs:

* shared (`share_prompt=True`): one row per pair, `[prompt[:-1] | prompt[-1] chosen | prompt[-1]
  rejected]` with chosen and rejected in branches 1 and 2 (`shared_prompt_batch`);
* unshared: row `2i` is `[prompt | chosen]`, row `2i + 1` is `[prompt | rejected]` (`per_turn_batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pdpo_jax.data.batching import empty_batch, per_turn_batch, shared_prompt_batch
from pdpo_jax.data.tokenization import PromptEncoder, TokenizedExample


@dataclass(frozen=True)
class PairIds:
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]  # response ids, end-of-turn ids included
    rejected_ids: tuple[int, ...]
    ref_chosen_logps: float = 0.0  # summed reference log-probs (frozen SFT model)
    ref_rejected_logps: float = 0.0
    pair_id: str = ""

    def unshared_length(self) -> int:
        """Tokens of the longer of the two unshared rows."""
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))

    def shared_length(self) -> int:
        """Tokens of the shared row: the prompt once, plus one copied prompt token per branch."""
        return len(self.prompt_ids) + 1 + len(self.chosen_ids) + len(self.rejected_ids)


def encode_pair(
    encoder: PromptEncoder,
    persona: Sequence[str],
    history: Sequence[str],
    chosen: str,
    rejected: str,
    *,
    ref_chosen_logps: float = 0.0,
    ref_rejected_logps: float = 0.0,
    max_length: int | None = None,
    pair_id: str = "",
) -> PairIds:
    """A pair's ids; over `max_length` the prompt loses its oldest history turns (the per-turn rule)
    until prompt + the longer response fit, so both layouts see the same prompt."""
    chosen_ids = tuple(encoder.response_ids(chosen))
    rejected_ids = tuple(encoder.response_ids(rejected))
    prompt, _ = encoder.fit_prompt(
        persona, history, max(len(chosen_ids), len(rejected_ids)), max_length, name=f"pair {pair_id!r}"
    )
    return PairIds(prompt, chosen_ids, rejected_ids, float(ref_chosen_logps), float(ref_rejected_logps), pair_id)


def dpo_batch(
    pairs: Sequence[PairIds | None],
    pad_to: int | None = None,
    pad_id: int = 0,
    bucket: int = 64,
    *,
    share_prompt: bool,
) -> dict[str, np.ndarray]:
    """The batch layout (shared: `[pairs, length]`; unshared: `[2 * pairs, length]`) plus
    `ref_chosen_logps`, `ref_rejected_logps` and `pair_mask` (float32 `[pairs]`). `None` pairs
    (the filler of a short last batch) are padding with pair_mask 0. Row lengths: `shared_length()`
    or `unshared_length()` of the longest pair, rounded up to `bucket` unless `pad_to` is given."""
    real = [i for i, pair in enumerate(pairs) if pair is not None]
    if share_prompt:
        batch = _shared(pairs, real, pad_to, pad_id, bucket)
    else:
        rows: list[TokenizedExample | None] = []
        for pair in pairs:
            if pair is None:
                rows += [None, None]
            else:
                rows += [TokenizedExample(f"{pair.pair_id}/chosen", pair.prompt_ids, pair.chosen_ids),
                         TokenizedExample(f"{pair.pair_id}/rejected", pair.prompt_ids, pair.rejected_ids)]
        batch = per_turn_batch(rows, pad_to, pad_id, bucket)  # row j is sequence j: chosen 2i, rejected 2i + 1
    pair_mask = np.zeros(len(pairs), np.float32)
    pair_mask[real] = 1.0
    batch["ref_chosen_logps"] = np.array([0.0 if p is None else p.ref_chosen_logps for p in pairs], np.float32)
    batch["ref_rejected_logps"] = np.array([0.0 if p is None else p.ref_rejected_logps for p in pairs], np.float32)
    batch["pair_mask"] = pair_mask
    return batch


def _shared(pairs, real: list[int], pad_to, pad_id: int, bucket: int) -> dict[str, np.ndarray]:
    if not real:
        return empty_batch(len(pairs), pad_to if pad_to is not None else bucket, pad_id)
    dense = shared_prompt_batch(
        [pairs[i].prompt_ids for i in real], [[pairs[i].chosen_ids, pairs[i].rejected_ids] for i in real],
        pad_to, pad_id, bucket,
    )
    if len(real) == len(pairs):
        return dense
    # shared_prompt_batch numbers the k-th real pair 2k, 2k + 1; move it to its own row and number.
    batch = empty_batch(len(pairs), dense["input_ids"].shape[1], pad_id)
    for k, i in enumerate(real):
        for key in batch:
            batch[key][i] = dense[key][k]
        scored = batch["sequence_ids"][i] >= 0
        batch["sequence_ids"][i][scored] += 2 * (i - k)
    return batch
