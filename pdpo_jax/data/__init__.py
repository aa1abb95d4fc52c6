"""Persona dialogue data: readers (dialogues, DNLI evaluation sets, NLI sentence pairs), examples
and splits, prompt templates, tokenization, persona shuffling and batching.

    dialogues = load_dialogues("valid_self_original_no_cands.txt")         # list[Dialogue]
    kept, report = drop_overlapping(dialogues, read_dnli("valid_havenot.jsonl"))
    train, val, test = split_dialogues(kept, (0.8, 0.1, 0.1), seed=0)
    tokenized, stats = tokenize_examples(examples_from_dialogues(train), tokenizer, "plain-en", max_length=512)
    for host_batch in BatchIterator(tokenized, batch_size=32, seed=0):
        arrays = per_turn_batch(host_batch.items)
"""

from pdpo_jax.data.batching import (
    BATCH_KEYS,
    SCORED_POSITIONS,
    bucketed_length,
    empty_batch,
    per_turn_batch,
    scored_width,
    shared_prompt_batch,
    with_scored_positions,
)
from pdpo_jax.data.dialogue import MODEL, PARTNER, Dialogue, ModelTurn, Turn, history_speakers
from pdpo_jax.data.dnli import CATEGORIES, CATEGORY_OF_GROUP, DnliExample, read_dnli
from pdpo_jax.data.examples import Example, examples_from_dialogues, split_dialogues
from pdpo_jax.data.fbdialog import read_fbdialog
from pdpo_jax.data.hf_personachat import read_hf_personachat
from pdpo_jax.data.inspect import inspect_file, inspect_files
from pdpo_jax.data.iterator import BatchIterator, HostBatch
from pdpo_jax.data.jpersonachat import read_jpersonachat
from pdpo_jax.data.jsonl import read_dialogue_jsonl, write_dialogue_jsonl
from pdpo_jax.data.loading import detect_format, load_dialogues
from pdpo_jax.data.nli_pairs import NLI_LABELS, NliPair, read_nli_pairs
from pdpo_jax.data.overlap import OverlapReport, drop_overlapping, normalize_utterance
from pdpo_jax.errors import DataError
from pdpo_jax.data.packing import (
    DialogueChunk,
    PackedRow,
    PackingError,
    dialogue_chunks,
    pack_chunks,
    pack_dialogues,
    packed_batch,
    packed_batches,
    packing_summary,
)
from pdpo_jax.data.pairs import PairIds, dpo_batch, encode_pair
from pdpo_jax.data.parallel_text import read_parallel_personachat
from pdpo_jax.data.shuffle import DerangementError, persona_derangement, persona_key
from pdpo_jax.data.templates import (
    PRESETS,
    PromptTemplate,
    TemplateError,
    chat_messages,
    load_template,
    prompt_segments,
    render_prompt,
)
from pdpo_jax.data.tokenization import (
    ExampleTooLongError,
    PromptEncoder,
    TokenizationStats,
    TokenizedExample,
    check_prefix_property,
    history_drop_choices,
    tokenize_examples,
)
from pdpo_jax.data.trees import PairTree, nested_history_cuts, nested_pairs, pair_trees, tree_batch, tree_summary

__all__ = [
    "BATCH_KEYS",
    "CATEGORIES",
    "CATEGORY_OF_GROUP",
    "MODEL",
    "NLI_LABELS",
    "PARTNER",
    "PRESETS",
    "SCORED_POSITIONS",
    "BatchIterator",
    "DataError",
    "DerangementError",
    "Dialogue",
    "DialogueChunk",
    "DnliExample",
    "Example",
    "ExampleTooLongError",
    "HostBatch",
    "ModelTurn",
    "NliPair",
    "OverlapReport",
    "PackedRow",
    "PackingError",
    "PairIds",
    "PairTree",
    "PromptEncoder",
    "PromptTemplate",
    "TemplateError",
    "TokenizationStats",
    "TokenizedExample",
    "Turn",
    "bucketed_length",
    "chat_messages",
    "check_prefix_property",
    "detect_format",
    "dialogue_chunks",
    "dpo_batch",
    "drop_overlapping",
    "empty_batch",
    "encode_pair",
    "examples_from_dialogues",
    "history_drop_choices",
    "history_speakers",
    "inspect_file",
    "inspect_files",
    "load_dialogues",
    "load_template",
    "nested_history_cuts",
    "nested_pairs",
    "normalize_utterance",
    "pack_chunks",
    "pack_dialogues",
    "packed_batch",
    "packed_batches",
    "packing_summary",
    "pair_trees",
    "per_turn_batch",
    "persona_derangement",
    "persona_key",
    "prompt_segments",
    "read_dialogue_jsonl",
    "read_dnli",
    "read_fbdialog",
    "read_hf_personachat",
    "read_jpersonachat",
    "read_nli_pairs",
    "read_parallel_personachat",
    "render_prompt",
    "scored_width",
    "shared_prompt_batch",
    "split_dialogues",
    "tokenize_examples",
    "tree_batch",
    "tree_summary",
    "with_scored_positions",
    "write_dialogue_jsonl",
]
