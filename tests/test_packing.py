"""Packed SFT dialogues and shared-prompt DPO pairs score exactly what per-turn rows score.

The references are independent: per-turn rows come from `tokenize_examples` + `per_turn_batch`
(one example per model turn) and unshared DPO rows from `per_turn_batch`; the models are tiny
random Hugging Face checkpoints loaded through `load_hf`. Tolerances are fp32 round-off of sums
over a few hundred tokens.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pdpo_jax.data import (
    Dialogue,
    Example,
    PromptEncoder,
    TemplateError,
    Turn,
    examples_from_dialogues,
    load_dialogues,
    per_turn_batch,
    render_prompt,
    tokenize_examples,
)
from pdpo_jax.data.packing import (
    DialogueChunk,
    PackedRow,
    PackingError,
    dialogue_chunks,
    pack_chunks,
    pack_dialogues,
    packed_batch,
    packed_batches,
)
from pdpo_jax.data.pairs import PairIds, dpo_batch, encode_pair
from pdpo_jax.data.tokenization import ExampleTooLongError, history_drop_choices
from pdpo_jax.model import load_hf, load_model
from pdpo_jax.scoring import sequence_scores, token_logps
from pdpo_jax.train.steps import DPOSettings, dpo_objective, sft_objective
from data_fixtures import byte_bpe_tokenizer, word_level_tokenizer
from model_fixtures import make_tiny_hf_model

LOGP_TOL = dict(rtol=1e-5, atol=2e-4)  # summed fp32 log-probs of up to ~40 tokens
GRAD_RTOL = 2e-4  # of the largest gradient entry

WORDS = ("i like cats dogs music pizza books rain sun work home family movies travel cars running "
         "what do you hi hello how are good great yes no my favorite is the a too really nice").split()


def utterance(rng: np.random.Generator) -> str:
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 7)))) + " ."


def make_dialogue(name: str, model_turns: int, model_first: bool = False, seed: int = 0) -> Dialogue:
    rng = np.random.default_rng(seed)
    persona = tuple(f"i like {w} ." for w in rng.choice(WORDS, size=3))
    speakers = (["model", "partner"] if model_first else ["partner", "model"]) * model_turns
    return Dialogue(name, persona, None, tuple(Turn(s, utterance(rng)) for s in speakers))


DIALOGUES = [
    make_dialogue("a", 3, seed=1),
    make_dialogue("b", 2, model_first=True, seed=2),
    make_dialogue("c", 1, seed=3),
    make_dialogue("d", 2, seed=4),
    make_dialogue("long", 9, seed=5),
]


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [t.text for d in DIALOGUES for t in d.turns] + [s for d in DIALOGUES for s in d.persona]
    corpus += ["Your persona : - Partner You system user assistant"]
    return word_level_tokenizer(corpus, bos=True)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, tokenizer):
    """(config, params) of a tiny random model per family, built on first use."""
    cache = {}

    def get(family: str):
        if family not in cache:
            vocab = -(-len(tokenizer) // 8) * 8
            positions = {"llama": "max_position_embeddings", "gpt2": "n_positions"}[family]
            path = make_tiny_hf_model(tmp_path_factory.mktemp(family), family, vocab_size=vocab, **{positions: 256})
            cache[family] = load_hf(path)
        return cache[family]

    return get


# Each family with one template keeps the suite short; both templates and both families are covered.
FAMILY_TEMPLATES = [("llama", "chat-en"), ("gpt2", "plain-en")]


def scored_ids(rows) -> list[tuple[str, int]]:
    """(dialogue, turn index) of each sequence id of `packed_batch(rows)`, in numbering order."""
    return [(c.dialogue_id, t) for row in rows if row is not None for c in row.chunks for t in c.turn_indices]


def per_turn_reference(rows, tokenizer, template):
    """Per-turn rows of exactly the responses the packed rows score, each with the history cut its
    chunk made, through the ordinary tokenization path."""
    by_id = {d.id: d for d in DIALOGUES}
    examples = []
    for row in rows:
        for chunk in row.chunks:
            dialogue = by_id[chunk.dialogue_id]
            for turn in dialogue.model_turns():
                if turn.index in chunk.turn_indices:
                    examples.append(Example(f"{dialogue.id}#{turn.index}", dialogue.id, dialogue.persona,
                                            turn.history[chunk.dropped_history_turns:], turn.response))
    tokenized, _ = tokenize_examples(examples, tokenizer, template)
    return tokenized


def assert_trees_close(a, b) -> None:
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    scale = max(float(jnp.max(jnp.abs(x))) for x in leaves_a)
    assert scale > 0
    for x, y in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=GRAD_RTOL * scale)


def sft_value_and_grad(config):
    return jax.jit(jax.value_and_grad(partial(sft_objective, config=config), has_aux=True))


def sequence_logps(params, config, batch, n):
    return np.asarray(jax.jit(lambda p, b: sequence_scores(p, config, b, n)[0])(params, batch))


# ---------------------------------------------------------------------------------------- equality


@pytest.mark.parametrize("family,template", FAMILY_TEMPLATES)
def test_packed_sft_equals_per_turn(tiny_models, tokenizer, family, template):
    config, params = tiny_models(family)
    encoder = PromptEncoder(tokenizer, template)
    rows = pack_dialogues(DIALOGUES, encoder, max_length=120)
    assert any(len(row.chunks) > 1 for row in rows), "some dialogues must share a row"
    assert len([c for row in rows for c in row.chunks if c.dialogue_id == "long"]) > 1, "the long dialogue must be cut"
    packed = packed_batch(rows, pad_id=tokenizer.pad_token_id)
    reference = per_turn_reference(rows, tokenizer, template)
    per_turn = per_turn_batch(reference, pad_id=tokenizer.pad_token_id)
    total_turns = sum(1 for d in DIALOGUES for _ in d.model_turns())
    assert len(reference) == total_turns and packed["input_ids"].size < per_turn["input_ids"].size / 2

    order = {(ex.example_id.split("#")[0], int(ex.example_id.split("#")[1])): i for i, ex in enumerate(reference)}
    packed_logps = sequence_logps(params, config, packed, total_turns)
    per_turn_logps = sequence_logps(params, config, per_turn, total_turns)
    np.testing.assert_allclose(packed_logps, per_turn_logps[[order[key] for key in scored_ids(rows)]], **LOGP_TOL)

    step = sft_value_and_grad(config)
    (packed_sum, packed_metrics), packed_grads = step(params, packed)
    (turn_sum, turn_metrics), turn_grads = step(params, per_turn)
    assert float(packed_metrics["loss"][1]) == float(turn_metrics["loss"][1]) == per_turn["loss_mask"].sum()
    np.testing.assert_allclose(float(packed_sum), float(turn_sum), rtol=1e-5)
    np.testing.assert_allclose(float(packed_metrics["loss"][0]), float(turn_metrics["loss"][0]), rtol=1e-5)
    assert_trees_close(packed_grads, turn_grads)


def dpo_pairs(tokenizer, template) -> list[PairIds | None]:
    tokenized, _ = tokenize_examples(examples_from_dialogues(DIALOGUES[:4]), tokenizer, template)
    rng = np.random.default_rng(0)
    pairs = [
        PairIds(ex.prompt_ids, ex.response_ids, tokenized[(i + 3) % len(tokenized)].response_ids,
                float(rng.normal(-20, 3)), float(rng.normal(-25, 3)), ex.example_id)
        for i, ex in enumerate(tokenized)
    ]
    return pairs[:3] + [None] + pairs[3:]  # a filler pair in the middle must not shift the numbering


@pytest.mark.parametrize("family,template", FAMILY_TEMPLATES)
def test_shared_prompt_dpo_equals_unshared(tiny_models, tokenizer, family, template):
    config, params = tiny_models(family)
    pairs = dpo_pairs(tokenizer, template)
    shared = dpo_batch(pairs, share_prompt=True, pad_id=tokenizer.pad_token_id)
    unshared = dpo_batch(pairs, share_prompt=False, pad_id=tokenizer.pad_token_id)
    assert shared["input_ids"].shape[0] == len(pairs) and unshared["input_ids"].shape[0] == 2 * len(pairs)
    assert shared["input_ids"].size < unshared["input_ids"].size
    for key in ("ref_chosen_logps", "ref_rejected_logps", "pair_mask"):
        np.testing.assert_array_equal(shared[key], unshared[key])

    shared_logps = sequence_logps(params, config, shared, 2 * len(pairs))
    np.testing.assert_allclose(shared_logps, sequence_logps(params, config, unshared, 2 * len(pairs)), **LOGP_TOL)
    assert shared_logps[6] == shared_logps[7] == 0.0 and np.all(shared_logps[[0, 1, 8, 9]] < 0)  # pair 3 is filler

    objective = jax.jit(jax.value_and_grad(partial(dpo_objective, config=config, settings=DPOSettings()), has_aux=True))
    (shared_sum, shared_metrics), shared_grads = objective(params, shared)
    (unshared_sum, unshared_metrics), unshared_grads = objective(params, unshared)
    np.testing.assert_allclose(float(shared_sum), float(unshared_sum), rtol=1e-5, atol=1e-6)
    for name, (total, count) in shared_metrics.items():
        assert float(count) == float(unshared_metrics[name][1]) == len(pairs) - 1
        np.testing.assert_allclose(float(total), float(unshared_metrics[name][0]), rtol=1e-4, atol=1e-4)
    assert_trees_close(shared_grads, unshared_grads)


def test_encode_pair_matches_per_turn_tokenization(tokenizer):
    dialogue = DIALOGUES[0]
    turn = list(dialogue.model_turns())[2]
    encoder = PromptEncoder(tokenizer, "chat-en")
    pair = encode_pair(encoder, dialogue.persona, turn.history, turn.response, "no .", ref_chosen_logps=-3.0, pair_id="p")
    example = encoder.encode(Example("x", "a", dialogue.persona, turn.history, turn.response))
    assert (pair.prompt_ids, pair.chosen_ids) == (example.prompt_ids, example.response_ids)
    assert pair.rejected_ids == tuple(encoder.response_ids("no .")) and pair.ref_chosen_logps == -3.0
    short = encode_pair(encoder, dialogue.persona, turn.history, turn.response, "no .", max_length=len(example) - 1)
    assert len(short.prompt_ids) + len(short.chosen_ids) <= len(example) - 1  # the longer response fits after the cut


# --------------------------------------------------------------------------------------- isolation


def test_changing_one_segment_changes_no_other(tiny_models, tokenizer):
    config, params = tiny_models("llama")
    rows = pack_dialogues(DIALOGUES[:4], PromptEncoder(tokenizer, "plain-en"), max_length=120)
    row = next(r for r in rows if len(r.chunks) >= 2)
    first, second = row.chunks[:2]
    rng = np.random.default_rng(0)
    changed = DialogueChunk(second.dialogue_id, tuple(int(t) for t in rng.integers(8, len(tokenizer), len(second))),
                            second.response_spans, second.turn_indices, second.dropped_history_turns)
    before = packed_batch([row])
    after = packed_batch([PackedRow((first, changed) + row.chunks[2:])])
    logps = jax.jit(lambda p, batch: token_logps(p, config, batch))
    a, b = np.asarray(logps(params, before))[0], np.asarray(logps(params, after))[0]
    in_first = before["segment_ids"][0] == 1
    in_second = before["segment_ids"][0] == 2
    np.testing.assert_allclose(a[in_first], b[in_first], rtol=0, atol=1e-6)
    rest = before["segment_ids"][0] > 2
    np.testing.assert_allclose(a[rest], b[rest], rtol=0, atol=1e-6)
    assert np.abs(a[in_second] - b[in_second]).max() > 1e-3  # the change is visible where it should be


def test_changing_chosen_does_not_change_rejected(tiny_models, tokenizer):
    config, params = tiny_models("gpt2")
    pairs = [p for p in dpo_pairs(tokenizer, "plain-en") if p is not None][:3]
    changed = [PairIds(p.prompt_ids, tuple(reversed(p.chosen_ids[:-1])) + (7,) + p.chosen_ids[-1:], p.rejected_ids)
               for p in pairs]
    before = sequence_logps(params, config, dpo_batch(pairs, share_prompt=True), 6)
    after = sequence_logps(params, config, dpo_batch(changed, share_prompt=True), 6)
    np.testing.assert_allclose(before[1::2], after[1::2], rtol=0, atol=1e-5)
    assert np.abs(before[0::2] - after[0::2]).min() > 1e-3


# ---------------------------------------------------------------------------------------- layout


def test_packed_batch_layout_by_hand():
    one = DialogueChunk("x", (5, 6, 7, 8, 9), ((2, 3), (4, 5)), (1, 3), 0)
    two = DialogueChunk("y", (10, 11, 12), ((1, 3),), (1,), 0)
    batch = packed_batch([PackedRow((one, two)), None, PackedRow((two,))], pad_id=0, bucket=4)
    assert batch["input_ids"].shape == (3, 8)
    assert batch["input_ids"][0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12]
    assert batch["positions"][0].tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2, 2]
    assert batch["targets"][0].tolist() == [6, 7, 8, 9, 0, 11, 12, 0]  # never the next segment's first token
    assert batch["loss_mask"][0].tolist() == [0, 1, 0, 1, 0, 1, 1, 0]
    assert batch["sequence_ids"][0].tolist() == [-1, 0, -1, 1, -1, 2, 2, -1]
    assert not batch["segment_ids"][1].any() and (batch["sequence_ids"][1] == -1).all()
    assert batch["sequence_ids"][2].tolist()[:3] == [3, 3, -1] and not batch["branch_ids"].any()


def test_first_fit_decreasing_is_deterministic_and_respects_the_row_length():
    chunks = [DialogueChunk(str(i), (1,) * n, ((n - 1, n),), (1,), 0) for i, n in enumerate([5, 3, 7, 2, 5, 1])]
    rows = pack_chunks(chunks, max_length=8)
    assert [[c.dialogue_id for c in row.chunks] for row in rows] == [["2", "5"], ["0", "1"], ["4", "3"]]
    assert rows == pack_chunks(chunks, max_length=8) and all(len(row) <= 8 for row in rows)
    assert [len(row.chunks) for row in pack_chunks(chunks, 8, pack=False)] == [1] * 6
    with pytest.raises(ValueError, match="exceeds max_length=6"):
        pack_chunks(chunks, max_length=6)


def test_packed_batches_cover_every_response_once_per_epoch(tokenizer):
    rows = pack_dialogues(DIALOGUES, PromptEncoder(tokenizer, "plain-en"), max_length=120, pack=False)
    batches = packed_batches(rows, batch_size=2, seed=0, pad_to=128)
    seen = []
    for _ in range(-(-len(rows) // 2)):
        host_batch, arrays = next(batches)
        assert arrays["input_ids"].shape == (2, 128) and host_batch.epoch == 0
        seen += scored_ids(host_batch.items)
        for r, item in enumerate(host_batch.items):
            assert (item is None) == (not arrays["segment_ids"][r].any())
    assert sorted(seen) == sorted((d.id, t.index) for d in DIALOGUES for t in d.model_turns())
    assert next(batches)[0].epoch == 1


# ---------------------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("template", ["plain-en", "chat-en"])
def test_long_dialogue_chunks(tokenizer, template):
    dialogue = DIALOGUES[-1]
    encoder = PromptEncoder(tokenizer, template)
    max_length = 80
    chunks = dialogue_chunks(dialogue, encoder, max_length)
    assert len(chunks) >= 3
    turns = list(dialogue.model_turns())
    responses = {t.index: tuple(encoder.response_ids(t.response)) for t in turns}
    persona = encoder.prompt_ids(dialogue.persona, [])[:-3]  # the persona block, before the first turn's cue
    assert [t for c in chunks for t in c.turn_indices] == [t.index for t in turns]  # each response exactly once, in order
    for k, chunk in enumerate(chunks):
        assert len(chunk) <= max_length and chunk.input_ids[: len(persona)] == tuple(persona)
        for (start, end), index in zip(chunk.response_spans, chunk.turn_indices):
            assert chunk.input_ids[start:end] == responses[index]
        first = next(t for t in turns if t.index == chunk.turn_indices[0])
        last = next(t for t in turns if t.index == chunk.turn_indices[-1])
        kept = last.history[chunk.dropped_history_turns:]
        assert chunk.input_ids == tuple(encoder.prompt_ids(dialogue.persona, kept)) + responses[last.index]
        choices = history_drop_choices(first.index)
        assert chunk.dropped_history_turns in choices
        fewer = [d for d in choices if d < chunk.dropped_history_turns]
        if fewer:  # the most recent history that fits: keeping one more allowed step would overflow
            longer = encoder.prompt_ids(dialogue.persona, last.history[fewer[-1]:])
            assert len(longer) + len(responses[last.index]) > max_length
        if k + 1 < len(chunks):  # the next turn would not have fit in this chunk even without history
            following = next(t for t in turns if t.index == chunks[k + 1].turn_indices[0])
            bare = encoder.prompt_ids(dialogue.persona, following.history[choices[-1]:])
            assert len(bare) + len(responses[following.index]) > max_length
    assert dialogue_chunks(dialogue, encoder, None)[0].turn_indices == tuple(t.index for t in turns)


def test_a_turn_that_cannot_fit_is_refused_or_skipped(tokenizer):
    long_turn = Dialogue("x", ("i like cats .",), None, (
        Turn("partner", "hi ."), Turn("model", "hello ."), Turn("partner", "what do you like ?"),
        Turn("model", " ".join(["cats"] * 60)), Turn("partner", "nice ."), Turn("model", "yes ."),
    ))
    encoder = PromptEncoder(tokenizer, "plain-en")
    with pytest.raises(ExampleTooLongError, match=r"dialogue 'x' turn 3: persona and response alone take \d+ tokens"):
        dialogue_chunks(long_turn, encoder, 40)
    chunks = dialogue_chunks(long_turn, encoder, 40, on_overflow="skip")
    assert [t for c in chunks for t in c.turn_indices] == [1, 5]


# ---------------------------------------------------------------------------------------- refusal


REWRITING_CHAT_TEMPLATE = (  # marks the newest user message, so every earlier prompt is rewritten by the next
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if loop.last and message['role'] == 'user' %}(latest) {% endif %}{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_chat_template_that_rewrites_earlier_turns_is_refused():
    corpus = [t.text for t in DIALOGUES[0].turns] + list(DIALOGUES[0].persona)
    tokenizer = word_level_tokenizer(corpus, chat_template=REWRITING_CHAT_TEMPLATE)
    with pytest.raises(PackingError, match=r"dialogue 'a' turn \d+: cannot pack this dialogue because its prompts do not nest"):
        pack_dialogues(DIALOGUES[:1], PromptEncoder(tokenizer, {"preset": "chat-en", "end_of_turn": "<|im_end|>"}), 500)
    assert issubclass(PackingError, TemplateError)


class WholeTextEncoder(PromptEncoder):
    """Tokenizes each prompt as one string, so BPE merges the end of a turn into the next one."""

    def prompt_ids(self, persona, history):
        return self.tokenizer(render_prompt(self.template, persona, history, self.tokenizer), add_special_tokens=False)["input_ids"]


def test_a_tokenization_that_rewrites_earlier_turns_is_refused():
    corpus = [t.text for d in DIALOGUES for t in d.turns] * 5 + ["Your persona: Partner: You: "] * 20
    tokenizer = byte_bpe_tokenizer(corpus)
    encoder = PromptEncoder(tokenizer, "plain-en")
    assert len(pack_dialogues(DIALOGUES[:1], encoder, 500)) == 1  # separate segments nest
    with pytest.raises(PackingError, match=r"dialogue 'a' turn \d+: .*prompt \+ response differ from the last turn's ids at token \d+"):
        pack_dialogues(DIALOGUES[:1], WholeTextEncoder(tokenizer, "plain-en"), 500)


# ------------------------------------------------------------------------------ staged PersonaChat


def test_packing_staged_personachat_keeps_every_response(shared_data):
    dialogues = load_dialogues(shared_data / "personachat" / "valid_self_original_no_cands.txt")[:40]
    corpus = [t.text for d in dialogues for t in d.turns] + [s for d in dialogues for s in d.persona]
    tokenizer = byte_bpe_tokenizer(corpus, vocab_size=2000, eos="<|im_end|>")
    encoder = PromptEncoder(tokenizer, "chat-en")
    rows = pack_dialogues(dialogues, encoder, max_length=256)
    expected = {(d.id, t.index) for d in dialogues for t in d.model_turns()}
    assert sorted(scored_ids(rows)) == sorted(expected) and all(len(r) <= 256 for r in rows)
    examples, _ = tokenize_examples(examples_from_dialogues(dialogues), tokenizer, "chat-en")
    packed = packed_batch(rows)
    assert packed["loss_mask"].sum() == sum(len(e.response_ids) for e in examples)
    assert packed["input_ids"].size * 3 < sum(len(e) for e in examples)


# ---------------------------------------------------------------------------- the bundled model


def staged_dialogues(shared_data, count: int, turns: int) -> list[Dialogue]:
    """The first `count` staged PersonaChat dialogues, cut to their first `turns` turns (runtime)."""
    dialogues = load_dialogues(shared_data / "personachat" / "valid_self_original_no_cands.txt")[:count]
    return [Dialogue(d.id, d.persona, d.partner_persona, d.turns[:turns]) for d in dialogues]


@pytest.fixture(scope="module")
def bundled(first_layers_model_path, shared_data):
    """The bundled model's tokenizer and first blocks (the layouts differ in masks and positions,
    which every block sees alike), with two staged dialogues."""
    loaded = load_model(first_layers_model_path)
    return loaded.config, loaded.params, loaded.tokenizer, staged_dialogues(shared_data, 2, 4)


def test_bundled_model_packed_sft_equals_per_turn(bundled):
    config, params, tokenizer, dialogues = bundled
    encoder = PromptEncoder(tokenizer, "chat-en")
    rows = pack_dialogues(dialogues, encoder, max_length=512)
    examples, _ = tokenize_examples(examples_from_dialogues(dialogues), tokenizer, "chat-en")
    length = 256  # one shape for both layouts: one compilation of the gradient
    per_turn = per_turn_batch(examples, pad_to=length, pad_id=tokenizer.pad_token_id)
    packed = packed_batch(list(rows) + [None] * (len(examples) - len(rows)), pad_to=length, pad_id=tokenizer.pad_token_id)
    assert len(rows) == 1 and len(rows[0].chunks) == 2  # both dialogues in one row, as two segments

    step = sft_value_and_grad(config)
    (packed_sum, packed_metrics), packed_grads = step(params, packed)
    (turn_sum, turn_metrics), turn_grads = step(params, per_turn)
    assert float(packed_metrics["loss"][1]) == float(turn_metrics["loss"][1]) > 0
    np.testing.assert_allclose(float(packed_sum), float(turn_sum), rtol=1e-5)
    assert_trees_close(packed_grads, turn_grads)


def test_bundled_model_shared_prompt_dpo_equals_unshared(bundled):
    config, params, tokenizer, dialogues = bundled
    encoder = PromptEncoder(tokenizer, "chat-en")
    examples = examples_from_dialogues(dialogues)[-2:]  # the two longest prompts
    pairs = [encode_pair(encoder, ex.persona, ex.history, ex.response, examples[1 - i].response,
                         ref_chosen_logps=-30.0 - i, ref_rejected_logps=-35.0 + i, pair_id=ex.id)
             for i, ex in enumerate(examples)]
    shared = dpo_batch(pairs, pad_id=tokenizer.pad_token_id, share_prompt=True)
    unshared = dpo_batch(pairs, pad_id=tokenizer.pad_token_id, share_prompt=False)
    objective = jax.jit(jax.value_and_grad(partial(dpo_objective, config=config, settings=DPOSettings()), has_aux=True))
    (shared_sum, shared_metrics), shared_grads = objective(params, shared)
    (unshared_sum, unshared_metrics), unshared_grads = objective(params, unshared)
    np.testing.assert_allclose(float(shared_sum), float(unshared_sum), rtol=1e-4, atol=1e-5)
    for name in ("logps/chosen", "logps/rejected", "rewards/margins"):
        np.testing.assert_allclose(float(shared_metrics[name][0]), float(unshared_metrics[name][0]), rtol=1e-5, atol=2e-4)
    assert_trees_close(shared_grads, unshared_grads)
