"""Token ids for prompts and responses, with truncation that keeps persona and response.

The prompt and the response are tokenized separately and their ids concatenated, so no token
merges across the boundary; the response ends with the end-of-turn ids (EOS for plain templates,
the chat template's end-of-turn token for chat templates). Too-long examples lose their oldest
history turns first, two at a time so the kept history still opens with a partner line.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pdpo_jax.data.examples import Example
from pdpo_jax.data.templates import (
    PromptTemplate,
    TemplateError,
    apply_chat_template,
    end_of_turn_text,
    load_template,
    prompt_segments,
    render_prompt,
)
from pdpo_jax.errors import PdpoError

OVERFLOW_POLICIES = ("error", "skip")


class ExampleTooLongError(PdpoError):
    """Persona and response alone do not fit in the allowed length."""


@dataclass(frozen=True)
class TokenizedExample:
    example_id: str
    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]  # ends with the end-of-turn ids
    dropped_history_turns: int = 0

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)


@dataclass(frozen=True)
class TokenizationStats:
    examples: int
    truncated: int
    skipped: int
    skipped_ids: tuple[str, ...] = field(default=())


class PromptEncoder:
    """A tokenizer and a template: ids of prompts, responses, and whole examples."""

    def __init__(self, tokenizer: Any, template: PromptTemplate | str | dict, cache_size: int = 65536):
        self.tokenizer = tokenizer
        self.template = load_template(template)
        # A dialogue's prompts repeat each other's segments, so ids and chat renderings are memoized.
        self._ids_cache: dict[str, tuple[int, ...]] = {}
        self._chat_cache: dict[tuple[tuple[str, str], ...], str] = {}
        self._cache_size = cache_size
        self.end_of_turn_ids = self._end_of_turn_ids()
        self.bos_ids = self._bos_ids()

    def _encode(self, text: str) -> list[int]:
        if not text:
            return []
        ids = self._ids_cache.get(text)
        if ids is None:
            if len(self._ids_cache) >= self._cache_size:
                self._ids_cache.clear()
            ids = self._ids_cache[text] = tuple(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(ids)

    def _render_chat(self, tokenizer: Any, messages: list[dict[str, str]]) -> str:
        key = tuple((m["role"], m["content"]) for m in messages)
        text = self._chat_cache.get(key)
        if text is None:
            if len(self._chat_cache) >= self._cache_size:
                self._chat_cache.clear()
            text = self._chat_cache[key] = apply_chat_template(tokenizer, messages)
        return text

    def _end_of_turn_ids(self) -> tuple[int, ...]:
        text = end_of_turn_text(self.template, self.tokenizer)
        token_id = self.tokenizer.convert_tokens_to_ids(text)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        ids = [token_id] if isinstance(token_id, int) and token_id != unk else self._encode(text)
        if not ids:
            raise TemplateError(f"end-of-turn text {text!r} encodes to no tokens")
        return tuple(ids)

    def _bos_ids(self) -> tuple[int, ...]:
        """The BOS the tokenizer itself adds (Llama-family yes, GPT-2 no); chat templates write their own."""
        bos = getattr(self.tokenizer, "bos_token_id", None)
        if self.template.kind == "chat" or bos is None:
            return ()
        added = list(self.tokenizer("", add_special_tokens=True)["input_ids"])
        return (bos,) if added[:1] == [bos] else ()

    def response_ids(self, response: str, end_of_turn: bool = True) -> list[int]:
        return self._encode(response) + (list(self.end_of_turn_ids) if end_of_turn else [])

    def prompt_ids(self, persona: Sequence[str], history: Sequence[str]) -> list[int]:
        ids = list(self.bos_ids)
        for i, text in enumerate(prompt_segments(self.template, persona, history, self.tokenizer, self._render_chat)):
            ids += self.response_ids(text) if i % 2 else self._encode(text)
        return ids

    def encode(self, example: Example, max_length: int | None = None) -> TokenizedExample:
        """The example's ids; over `max_length`, the oldest history turns go first."""
        response = tuple(self.response_ids(example.response))
        prompt, dropped = self.fit_prompt(example.persona, example.history, len(response), max_length, name=f"example {example.id!r}")
        return TokenizedExample(example.id, prompt, response, dropped)

    def fit_history(self, persona: Sequence[str], history: Sequence[str], room: int) -> tuple[str, ...] | None:
        """The longest allowed tail of `history` (see `history_drop_choices`) whose prompt takes at
        most `room` tokens; None when even the persona alone does not fit."""
        history = tuple(history)
        try:
            _, dropped = self.fit_prompt(persona, history, 0, room)
        except ExampleTooLongError:
            return None
        return history[dropped:]

    def fit_prompt(
        self,
        persona: Sequence[str],
        history: Sequence[str],
        reserved: int,
        max_length: int | None,
        drop_choices: Sequence[int] | None = None,
        name: str = "example",
    ) -> tuple[tuple[int, ...], int]:
        """`(prompt ids, dropped)`: the prompt with the fewest oldest history turns dropped, out of
        `drop_choices` (ascending; default `history_drop_choices(len(history))`), such that it and
        `reserved` more tokens fit in `max_length`. Raises ExampleTooLongError when even the
        largest choice does not fit."""

        def prompt_after_dropping(dropped: int) -> tuple[int, ...]:
            return tuple(self.prompt_ids(persona, history[dropped:]))

        def fits(prompt: tuple[int, ...]) -> bool:
            return max_length is None or len(prompt) + reserved <= max_length

        prompt = prompt_after_dropping(0)
        if fits(prompt):
            return prompt, 0
        choices = list(history_drop_choices(len(history)) if drop_choices is None else drop_choices)
        shortest = prompt_after_dropping(choices[-1])
        if not fits(shortest):
            what = "persona and response alone take" if choices[-1] == len(history) else "the shortest allowed prompt and the rest take"
            raise ExampleTooLongError(
                f"{name}: {what} {len(shortest) + reserved} tokens "
                f"(prompt {len(shortest)}, response {reserved}), more than max_length={max_length}"
            )
        low, high = 0, len(choices) - 1  # the prompt shrinks as turns go: find the fewest dropped that fit
        while low < high:
            middle = (low + high) // 2
            if fits(prompt_after_dropping(choices[middle])):
                high = middle
            else:
                low = middle + 1
        return prompt_after_dropping(choices[low]), choices[low]


def history_drop_choices(history_length: int) -> list[int]:
    """How many of the oldest history turns truncation may drop, fewest first: none, then so many
    that the kept history still opens with a partner line (2, 4, ... turns before the answered
    partner line), or all of them."""
    return sorted({0, history_length} | set(range(1 + history_length % 2, history_length, 2)))


def tokenize_examples(
    examples: Iterable[Example],
    tokenizer: Any,
    template: PromptTemplate | str | dict,
    max_length: int | None = None,
    on_overflow: str = "error",
) -> tuple[list[TokenizedExample], TokenizationStats]:
    """Every example tokenized; with `on_overflow="skip"` examples that cannot fit are counted, not raised."""
    if on_overflow not in OVERFLOW_POLICIES:
        raise ValueError(f"on_overflow must be one of {OVERFLOW_POLICIES}, not {on_overflow!r}")
    encoder = PromptEncoder(tokenizer, template)
    out: list[TokenizedExample] = []
    skipped: list[str] = []
    count = 0
    for example in examples:
        count += 1
        try:
            out.append(encoder.encode(example, max_length))
        except ExampleTooLongError:
            if on_overflow == "error":
                raise
            skipped.append(example.id)
    truncated = sum(1 for t in out if t.dropped_history_turns)
    return out, TokenizationStats(count, truncated, len(skipped), tuple(skipped))


_SAMPLE_DIALOGUES = {
    "en": (
        ("i like cats .", "i live in a small town ."),
        ("hi , how are you ?", "great , i just fed my cats !", "you have cats ?", "two of them . do you have pets ?", "no , i am allergic .", "oh no ! to cats or dogs ?", "both , sadly ."),
    ),
    "ja": (
        ("猫が好きです。", "小さな町に住んでいます。"),
        ("こんにちは、元気ですか?", "元気です。猫にご飯をあげたところです!", "猫を飼っているんですか?", "二匹います。ペットはいますか?", "いいえ、アレルギーなんです。", "それは大変!猫ですか、犬ですか?", "両方です。"),
    ),
}


def check_prefix_property(
    template: PromptTemplate | str | dict,
    tokenizer: Any,
    persona: Sequence[str] | None = None,
    utterances: Sequence[str] | None = None,
) -> int:
    """Check that each model turn's prompt + response ids is a prefix of the next model turn's
    prompt, as text and as token ids, for a dialogue whose odd-numbered utterances (0-based) are
    the model's. Raises TemplateError at the first turn that breaks it; returns the turns checked."""
    encoder = PromptEncoder(tokenizer, template)
    sample_persona, sample_utterances = _SAMPLE_DIALOGUES.get(encoder.template.language, _SAMPLE_DIALOGUES["en"])
    persona = tuple(persona if persona is not None else sample_persona)
    utterances = tuple(utterances if utterances is not None else sample_utterances)
    eot = end_of_turn_text(encoder.template, tokenizer)
    checked = 0
    for turn in range(1, len(utterances) - 2, 2):
        history, response, later = utterances[:turn], utterances[turn], utterances[: turn + 2]
        text, next_text = (render_prompt(encoder.template, persona, h, tokenizer) for h in (history, later))
        if not next_text.startswith(text + response + eot):
            raise TemplateError(f"turn {turn}: the next prompt does not start with prompt + response + {eot!r}:\n{text!r}\n{next_text!r}")
        ids = encoder.prompt_ids(persona, history) + encoder.response_ids(response)
        next_ids = encoder.prompt_ids(persona, later)
        if next_ids[: len(ids)] != ids:
            split = next((i for i, (a, b) in enumerate(zip(ids, next_ids)) if a != b), min(len(ids), len(next_ids)))
            raise TemplateError(f"turn {turn}: token ids of the next prompt differ from prompt + response at position {split}")
        checked += 1
    return checked
