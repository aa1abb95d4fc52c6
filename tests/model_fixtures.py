"""Tiny random Hugging Face models saved to disk, and batch builders, shared by model tests.

Models are built with PyTorch transformers (the reference implementation) and saved with
save_pretrained in safetensors, exactly like a downloaded checkpoint.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

TINY_VOCAB = 128

FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=TINY_VOCAB,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    "llama": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2),
    "mistral": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                    sliding_window=5, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=TINY_VOCAB, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2),
}


def hf_config(family: str, **overrides: Any):
    import transformers

    config = transformers.AutoConfig.for_model(family, **(FAMILY_DEFAULTS[family] | overrides))
    config._attn_implementation = "eager"  # the sliding window is applied by every implementation, eager is simplest
    return config


def make_tiny_hf_model(tmp_path: Path, family: str, *, seed: int = 0, name: str | None = None, **overrides: Any) -> Path:
    """Saves a random tiny `family` model (gpt2/llama/mistral/qwen2) under tmp_path; returns its dir."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = hf_config(family, **overrides)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():  # non-trivial norms and biases so a swapped or dropped one shows in the logits
        for param_name, param in model.named_parameters():
            if param_name.endswith("bias") or "norm" in param_name or "ln_" in param_name:
                param.add_(0.1 * torch.randn_like(param))
    out = Path(tmp_path) / (name or f"tiny-{family}")
    model.save_pretrained(out, safe_serialization=True)
    return out


def load_torch_model(path: Path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", dtype="float32")
    return model.eval()


def torch_logits(model, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.as_tensor(input_ids, dtype=torch.long),
            attention_mask=torch.as_tensor(attention_mask, dtype=torch.long),
            position_ids=torch.as_tensor(position_ids, dtype=torch.long),
        )
    return out.logits.float().numpy()


def padded_batch(lengths: list[int], width: int, *, left: bool = False, seed: int = 0, vocab: int = TINY_VOCAB) -> dict[str, np.ndarray]:
    """Random ids in rows of the given lengths, right- (or left-) padded; positions from the mask."""
    rng = np.random.default_rng(seed)
    batch = len(lengths)
    mask = np.zeros((batch, width), np.int32)
    for row, n in enumerate(lengths):
        if left:
            mask[row, width - n:] = 1
        else:
            mask[row, :n] = 1
    ids = rng.integers(3, vocab, size=(batch, width)).astype(np.int32) * mask
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "positions": positions, "segment_ids": mask.copy(), "attention_mask": mask}


@dataclasses.dataclass(frozen=True, eq=False)
class RecordingSampler:
    """Draws with `inner` and hands every logits array it is asked to choose from to the host, in order."""

    inner: Any
    seen: list = dataclasses.field(default_factory=list)

    def choose(self, logits, key):
        import jax

        jax.debug.callback(lambda x: self.seen.append(np.asarray(x)), logits, ordered=True)
        return self.inner.choose(logits, key)


def early_stopping_eos(tokens: np.ndarray, pad: int, *, earliest: int, latest: int) -> int:
    """A token that one row of `tokens` first produces between steps `earliest` and `latest` and
    another row never produces: as the end of sequence, it stops one row mid-way only."""
    for token in np.unique(tokens):
        first = [np.flatnonzero(row == token)[:1] for row in tokens]
        midway = any(f.size and earliest <= f[0] <= latest for f in first)
        if token != pad and midway and any(f.size == 0 for f in first):
            return int(token)
    raise AssertionError(f"no token in {tokens.tolist()} stops one row mid-way and leaves another running")
