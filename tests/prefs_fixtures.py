"""A small slice of the staged PersonaChat file and tiny models with tokenizers, for the
preference-building and generation tests.

Models are random (PyTorch transformers, saved like a download) with a tokenizer trained on the
slice, so prompts from real dialogues tokenize without unknown words.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from data_fixtures import byte_bpe_tokenizer, word_level_tokenizer
from model_fixtures import make_tiny_hf_model

PERSONACHAT = Path("personachat") / "valid_self_original_no_cands.txt"
MAX_POSITIONS = 512


def staged_slice(shared_data: Path, out_dir: Path, train_dialogues: int = 5, train_turns: int = 2,
                 val_dialogues: int = 3, val_turns: int = 1) -> tuple[Path, Path, list]:
    """train.jsonl / val.jsonl: the first dialogues of the staged file, each cut after a few
    model turns (train: 5 x 2 = 10 examples, val: 3 x 1 = 3)."""
    from pdpo_jax.data import load_dialogues, write_dialogue_jsonl
    from pdpo_jax.data.dialogue import MODEL, Dialogue

    dialogues = load_dialogues(shared_data / PERSONACHAT)

    def cut(dialogue: Dialogue, model_turns: int) -> Dialogue:
        ends = [i for i, t in enumerate(dialogue.turns) if t.speaker == MODEL]
        return Dialogue(dialogue.id, dialogue.persona, dialogue.partner_persona,
                        dialogue.turns[: ends[model_turns - 1] + 1], dialogue.source, dialogue.conversation_id)

    train = [cut(d, train_turns) for d in dialogues[:train_dialogues]]
    val = [cut(d, val_turns) for d in dialogues[train_dialogues : train_dialogues + val_dialogues]]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_dialogue_jsonl(out_dir / "train.jsonl", train)
    write_dialogue_jsonl(out_dir / "val.jsonl", val)
    return out_dir / "train.jsonl", out_dir / "val.jsonl", train + val


def corpus_text(dialogues: list) -> list[str]:
    """Every persona sentence and utterance, plus the words templates add around them."""
    return [s for d in dialogues for s in (*d.persona, *(t.text for t in d.turns))] + [
        "your persona : partner you system user assistant"
    ]


def tiny_llama_with_words(out_dir: Path, texts: list[str], seed: int = 0) -> Path:
    """A random tiny Llama and a word-level tokenizer of `texts` (chat template: ChatML) in one directory."""
    tokenizer = word_level_tokenizer(texts)
    ids = tokenizer.convert_tokens_to_ids
    model_dir = make_tiny_hf_model(out_dir, "llama", seed=seed, name=f"llama-words-{seed}", vocab_size=len(tokenizer),
                                   max_position_embeddings=MAX_POSITIONS, bos_token_id=ids("<s>"),
                                   eos_token_id=ids("</s>"), pad_token_id=ids("<pad>"))
    tokenizer.save_pretrained(model_dir)
    return model_dir


def tiny_gpt2_that_stops(out_dir: Path, texts: list[str], stop_probability: float = 0.2) -> Path:
    """A tiny GPT-2 with a byte-level BPE tokenizer whose next-token distribution is the same at
    every step: the chat end of turn `<|im_end|>` with `stop_probability`, the rest uniform. Its
    samples are a mix of empty, ordinary and cut-off responses."""
    import math

    import torch
    import transformers

    tokenizer = byte_bpe_tokenizer(texts, vocab_size=300)
    vocab, end_of_turn = len(tokenizer), tokenizer.convert_tokens_to_ids("<|im_end|>")
    model_dir = make_tiny_hf_model(out_dir, "gpt2", name="gpt2-stopper", vocab_size=vocab, n_positions=MAX_POSITIONS,
                                   bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
                                   eos_token_id=tokenizer.eos_token_id)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    # ln_f outputs its bias alone (weight 0): hidden = 1 * e_0, so logits = wte[:, 0] at every step.
    stop_logit = math.log(stop_probability * (vocab - 1) / (1 - stop_probability))
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.zero_()
        model.transformer.ln_f.bias[0] = 1.0
        model.transformer.wte.weight[:, 0] = 0.0
        model.transformer.wte.weight[end_of_turn, 0] = stop_logit
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def write_config(path: Path, *, train: Path, val: Path, run_dir: Path, generator: Path | None,
                 reference: Path | None, **prefs) -> Path:
    config = {
        "run_dir": str(run_dir),
        "seed": 0,
        "data": {"train": [str(train)], "val": [str(val)], "template": "chat-en", "max_length": 256},
        "prefs": {"generator": str(generator) if generator else None,
                  "reference": str(reference) if reference else None,
                  "sampler": {"kind": "top_p", "top_p": 0.9, "temperature": 1.0},
                  "max_new_tokens": 8, "batch_size": 3, "shard_size": 4, "seed": 7} | prefs,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# One record line as make-prefs writes it (key order, separators, non-ASCII text kept as is, floats
# as Python's repr): the typed record must read it and write back these very bytes.
STORED_RECORD_LINE = (
    '{"example_id": "valid-12#3", "dialogue_id": "valid-12", "donor_dialogue_id": "valid-40", "split": "train", '
    '"persona": ["i love cats .", "私は猫が好きです。"], "donor_persona": ["i am a chef .", "i live in paris ."], '
    '"history": ["hi ! any pets ?", "two cats , you ?", "a dog named rex ."], "history_turns_dropped": 2, '
    '"chosen": "rex is a great name ! my cats would hate him .", "rejected": "i cook french food — every day .", '
    '"shuffled": true, "generator": "runs/main/sft/best", '
    '"generator_digest": "sha256:9f2c4e8a1b7d3f60c5e2a9d4b8f1c7e3a6d0b5f9e2c8a4d7b1f6e3c9a0d5b2f8", '
    '"reference": "runs/main/sft/best", '
    '"reference_digest": "sha256:9f2c4e8a1b7d3f60c5e2a9d4b8f1c7e3a6d0b5f9e2c8a4d7b1f6e3c9a0d5b2f8", '
    '"sampler": {"kind": "TopP", "p": 0.9, "temperature": 1.0}, "max_new_tokens": 32, "sample_seed": 1718398214, '
    '"sample_row": 5, "ref_chosen_logp": -41.83720397949219, "ref_rejected_logp": -63.0054931640625, '
    '"chosen_tokens": 14, "rejected_tokens": 12, "degenerate": [], "dropped": false}'
)
