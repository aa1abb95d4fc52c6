"""Prompt templates, the turn-to-turn prefix property, tokenization and truncation."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data_fixtures import byte_bpe_tokenizer, word_level_tokenizer
from pdpo_jax.data import (
    PRESETS,
    Example,
    ExampleTooLongError,
    PromptEncoder,
    PromptTemplate,
    TemplateError,
    check_prefix_property,
    load_template,
    per_turn_batch,
    prompt_segments,
    render_prompt,
    tokenize_examples,
)

WORDS = "i you like cats dogs tea the a is are my your hello hi how what do not . , ? ! 私 猫 好き です 。".split()
CORPUS = [" ".join(WORDS), "Your persona : You Partner system user assistant あなた の プロフィール 相手"]


@functools.cache
def tokenizers():
    return {
        "word": word_level_tokenizer(CORPUS, bos=True),
        "bpe": byte_bpe_tokenizer(CORPUS * 20 + ["hello how are you ? i like cats . do you like dogs ?"] * 20),
    }


PERSONA = ("i like cats .", "i like tea .")
HISTORY = ("hi", "hello !", "do you like dogs ?")


def test_plain_en_renders_persona_then_history_ending_with_the_response_prefix():
    tok = tokenizers()["word"]
    assert render_prompt(PRESETS["plain-en"], PERSONA, HISTORY, tok) == (
        "Your persona:\n- i like cats .\n- i like tea .\nPartner: hi\nYou: hello !</s>\nPartner: do you like dogs ?\nYou: "
    )
    assert prompt_segments(PRESETS["plain-en"], PERSONA, HISTORY) == [
        "Your persona:\n- i like cats .\n- i like tea .\nPartner: hi\nYou: ", "hello !", "\nPartner: do you like dogs ?\nYou: ",
    ]
    assert render_prompt(PRESETS["plain-ja"], ("猫が好きです。",), ("こんにちは",), tok).startswith("あなたのプロフィール:\n- 猫が好きです。\n相手: こんにちは\nあなた: ")


def test_chat_template_has_system_persona_and_alternating_roles():
    tok = tokenizers()["word"]
    text = render_prompt(PRESETS["chat-en"], PERSONA, HISTORY, tok)
    assert text == (
        "<|im_start|>system\nYou are chatting with a partner. Stay in character with this persona:\n- i like cats .\n- i like tea .<|im_end|>\n"
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello !<|im_end|>\n"
        "<|im_start|>user\ndo you like dogs ?<|im_end|>\n<|im_start|>assistant\n"
    )
    encoder = PromptEncoder(tok, "chat-en")
    assert encoder.end_of_turn_ids == (tok.convert_tokens_to_ids("<|im_end|>"),) and encoder.bos_ids == ()
    assert PromptEncoder(tok, "plain-en").bos_ids == (tok.bos_token_id,)
    assert PromptEncoder(tokenizers()["bpe"], "plain-en").bos_ids == ()


def test_templates_are_configuration():
    assert load_template("plain-ja") is PRESETS["plain-ja"]
    custom = load_template({"preset": "plain-en", "model_label": "Me: ", "persona_line": "* {sentence}"})
    assert custom.kind == "plain" and custom.model_label == "Me: " and custom.partner_label == "Partner: "
    assert PromptTemplate.from_dict(custom.to_dict()) == custom
    with pytest.raises(TemplateError, match="unknown template key"):
        load_template({"kind": "plain", "speaker": "x"})
    with pytest.raises(TemplateError, match="kind must be one of"):
        load_template({"kind": "json"})
    with pytest.raises(TemplateError, match="unknown template preset"):
        load_template("plain-fr")
    with pytest.raises(TemplateError, match="persona_line"):
        load_template({"persona_line": "{persona}"})


@pytest.mark.parametrize("tokenizer_name", ["word", "bpe"])
@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_prefix_property_holds_for_presets(tokenizer_name, preset_name):
    assert check_prefix_property(preset_name, tokenizers()[tokenizer_name]) == 2
    long_dialogue = tuple(f"turn {i} ." for i in range(9))
    assert check_prefix_property(preset_name, tokenizers()[tokenizer_name], PERSONA, long_dialogue) == 3


def test_prefix_check_catches_a_template_that_rewrites_history():
    tok = word_level_tokenizer(CORPUS)
    # a template that only shows the latest user message: turn t + 1's prompt no longer extends turn t's
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' or loop.last %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    with pytest.raises(TemplateError, match="cannot find the token the chat template writes"):
        check_prefix_property("chat-en", tok)
    with pytest.raises(TemplateError, match="does not extend the previous prompt"):
        check_prefix_property({"preset": "chat-en", "end_of_turn": "<|im_end|>"}, tok)


def test_prompt_and_response_are_tokenized_separately():
    tok = tokenizers()["bpe"]
    encoder = PromptEncoder(tok, "plain-en")
    example = Example("d#3", "d", PERSONA, HISTORY, "i like dogs .")
    tokenized = encoder.encode(example)
    response = tok("i like dogs .", add_special_tokens=False)["input_ids"]
    assert list(tokenized.response_ids) == response + [tok.eos_token_id]
    assert tok.decode(tokenized.prompt_ids) == render_prompt(PRESETS["plain-en"], PERSONA, HISTORY, tok)
    assert tokenized.example_id == "d#3" and tokenized.dropped_history_turns == 0


sentences = st.lists(st.sampled_from(WORDS), min_size=1, max_size=6).map(" ".join)


@settings(max_examples=60, deadline=None)
@given(
    persona=st.lists(sentences, min_size=1, max_size=4),
    history_length=st.integers(0, 13),
    history=st.lists(sentences, min_size=13, max_size=13),
    response=sentences,
    max_length=st.integers(8, 120),
    preset_name=st.sampled_from(sorted(PRESETS)),
    tokenizer_name=st.sampled_from(["word", "bpe"]),
)
def test_truncation_keeps_persona_and_response(persona, history_length, history, response, max_length, preset_name, tokenizer_name):
    tok = tokenizers()[tokenizer_name]
    encoder = PromptEncoder(tok, preset_name)
    history = tuple(history[13 - history_length :])  # an even length: the model opened the dialogue
    example = Example("x#0", "x", tuple(persona), history, response)
    try:
        tokenized = encoder.encode(example, max_length)
    except ExampleTooLongError as err:
        assert "'x#0'" in str(err)
        assert len(encoder.prompt_ids(persona, ())) + len(encoder.response_ids(response)) > max_length
        return
    kept = history[tokenized.dropped_history_turns :]
    assert len(tokenized) <= max_length
    assert tokenized.dropped_history_turns == 0 or not kept or len(kept) % 2 == 1  # a cut history opens with the partner
    # the prompt is the full rendering of persona + the newest turns, the response is intact
    assert list(tokenized.prompt_ids) == encoder.prompt_ids(persona, kept)
    assert list(tokenized.response_ids) == encoder.response_ids(response)
    text = render_prompt(encoder.template, persona, kept, tok)
    assert encoder.template.persona_block(persona) in text and text.index(encoder.template.persona_block(persona)) < 30
    if tokenizer_name == "bpe":  # byte-level BPE decodes back to the exact text
        assert tok.decode(tokenized.prompt_ids) == text
    if tokenized.dropped_history_turns:  # the next longer allowed history would not have fit
        allowed = [0] + [d for d in range(1, len(history) + 1) if d == len(history) or (len(history) - d) % 2]
        longer = max(d for d in allowed if d < tokenized.dropped_history_turns)
        assert len(encoder.prompt_ids(persona, history[longer:])) + len(tokenized.response_ids) > max_length
    batch = per_turn_batch([tokenized], bucket=16)
    mask = batch["loss_mask"][0] > 0
    assert batch["targets"][0][mask].tolist() == list(tokenized.response_ids)  # response tokens + end of turn, nothing else


def test_overflow_policy():
    tok = tokenizers()["word"]
    examples = [Example("a#1", "a", PERSONA, HISTORY, "hi"), Example("b#1", "b", PERSONA * 20, HISTORY, "hi")]
    kept, stats = tokenize_examples(examples, tok, "plain-en", max_length=40, on_overflow="skip")
    assert [t.example_id for t in kept] == ["a#1"] and stats.skipped == 1 and stats.skipped_ids == ("b#1",)
    with pytest.raises(ExampleTooLongError, match=r"example 'b#1': persona and response alone take \d+ tokens"):
        tokenize_examples(examples, tok, "plain-en", max_length=40)
    _, stats = tokenize_examples(examples[:1], tok, "plain-en", max_length=28)
    assert stats.truncated == 1
