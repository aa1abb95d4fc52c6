"""Prompt templates: how persona and history become the text before a response.

A template is configuration (`PromptTemplate.from_dict`), in one of two kinds:

* "plain": text with speaker labels, e.g. for `plain-en`

      Your persona:
      - i like cats.
      Partner: hi , how are you ?
      You: <response><end of turn>
      Partner: ...
      You:

  `model_label` is also the response prefix: the prompt ends with it.
* "chat": the tokenizer's chat template, with a system message holding the persona block and
  alternating user (partner) / assistant (model) messages.

Persona comes first, then history. Rendering is split into segments so that a whole dialogue can be
packed into one row: segments alternate context, response, context, ..., context (always an odd
count). The prompt's text is the segments joined with the end-of-turn text after every response,
and its ids are each context tokenized on its own and each response tokenized like a target
(response ids + end-of-turn ids). Hence the prompt of the next model turn equals this prompt +
response + end of turn + the next partner line, as text and as token ids;
`check_prefix_property` verifies it for a template and tokenizer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import yaml

from pdpo_jax.data.dialogue import MODEL, history_speakers
from pdpo_jax.errors import PdpoError

KINDS = ("plain", "chat")


class TemplateError(PdpoError):
    """A template that cannot render, or whose prompts do not nest turn by turn."""


@dataclass(frozen=True)
class PromptTemplate:
    kind: str = "plain"
    language: str = "en"
    persona_header: str = "Your persona:"
    persona_line: str = "- {sentence}"  # formatted with sentence=...
    partner_label: str = "Partner: "  # plain only
    model_label: str = "You: "  # plain only; also the response prefix
    separator: str = "\n"  # between persona lines and between plain turns
    end_of_turn: str | None = None  # None: the tokenizer's EOS token

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise TemplateError(f"template kind must be one of {KINDS}, not {self.kind!r}")
        try:
            self.persona_line.format(sentence="x")
        except (KeyError, IndexError, ValueError) as err:
            raise TemplateError(f"persona_line {self.persona_line!r} must use only {{sentence}}: {err!r}") from None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> PromptTemplate:
        """Keys are the field names; `preset` names a built-in template that the other keys override."""
        config = dict(config)
        base = preset(config.pop("preset")) if "preset" in config else cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise TemplateError(f"unknown template key(s) {unknown}; known: {sorted(known) + ['preset']}")
        return replace(base, **config)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def persona_block(self, persona: Sequence[str]) -> str:
        lines = [self.persona_line.format(sentence=s) for s in persona]
        return self.separator.join(([self.persona_header] if self.persona_header else []) + lines)


PRESETS: dict[str, PromptTemplate] = {
    "plain-en": PromptTemplate(),
    "plain-ja": PromptTemplate(
        language="ja", persona_header="あなたのプロフィール:", partner_label="相手: ", model_label="あなた: "
    ),
    "chat-en": PromptTemplate(
        kind="chat",
        persona_header="You are chatting with a partner. Stay in character with this persona:",
        partner_label="",
        model_label="",
    ),
    "chat-ja": PromptTemplate(
        kind="chat",
        language="ja",
        persona_header="あなたは相手と雑談しています。次のプロフィールの人物として話してください:",
        partner_label="",
        model_label="",
    ),
}


def preset(name: str) -> PromptTemplate:
    if name not in PRESETS:
        raise TemplateError(f"unknown template preset {name!r}; presets: {sorted(PRESETS)}")
    return PRESETS[name]


TEMPLATE_FILE_SUFFIXES = (".yaml", ".yml")


def load_template(spec: str | os.PathLike | dict[str, Any] | PromptTemplate) -> PromptTemplate:
    """A template from a preset name, a YAML file of template fields, a dict of them, or a template.

    Every stage takes its template through here, so `data.template: my_template.yaml` works in
    training, preference building, evaluation and generation alike.
    """
    if isinstance(spec, PromptTemplate):
        return spec
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec not in PRESETS
                                          and Path(spec).suffix.lower() in TEMPLATE_FILE_SUFFIXES):
        return read_template_file(spec)
    if isinstance(spec, str):
        return preset(spec)
    return PromptTemplate.from_dict(spec)


def read_template_file(path: str | os.PathLike) -> PromptTemplate:
    try:
        fields = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise TemplateError(f"{path}: cannot read the template file: {' '.join(str(err).split())[:200]}") from None
    except RecursionError:
        raise TemplateError(f"{path}: cannot read the template file: nested too deeply") from None
    if not isinstance(fields, dict):
        raise TemplateError(f"{path}: a template file must be a mapping of template fields")
    try:
        return PromptTemplate.from_dict(fields)
    except TemplateError as err:
        raise TemplateError(f"{path}: {err}") from None


def end_of_turn_text(template: PromptTemplate, tokenizer: Any) -> str:
    """The text that closes a model turn: the template's `end_of_turn`, else for chat templates the
    special token the chat template writes after an assistant message, else the EOS token."""
    if template.end_of_turn is not None:
        return template.end_of_turn
    if template.kind == "chat":
        return _chat_end_of_turn(tokenizer)
    text = getattr(tokenizer, "eos_token", None)
    if not text:
        raise TemplateError("no end-of-turn text: set the template's end_of_turn or use a tokenizer with an EOS token")
    return text


def _chat_end_of_turn(tokenizer: Any) -> str:
    probe = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    prompt = apply_chat_template(tokenizer, probe)
    full = tokenizer.apply_chat_template(
        probe + [{"role": "assistant", "content": "r"}, {"role": "user", "content": "v"}], tokenize=False
    )
    if full.startswith(prompt + "r"):
        rest = full[len(prompt) + 1 :]
        specials = sorted(set(getattr(tokenizer, "all_special_tokens", [])), key=len, reverse=True)
        for token in specials:
            if token and rest.startswith(token):
                return token
    raise TemplateError(
        "cannot find the token the chat template writes right after an assistant message; set end_of_turn"
    )


ChatRenderer = Callable[[Any, list[dict[str, str]]], str]


def prompt_segments(
    template: PromptTemplate,
    persona: Sequence[str],
    history: Sequence[str],
    tokenizer: Any = None,
    render_chat: ChatRenderer | None = None,
) -> list[str]:
    """[context, response, context, ..., context] for the model turn answering `history`.
    `render_chat(tokenizer, messages)` replaces the chat-template call (e.g. with a memoized one)."""
    if template.kind == "plain":
        return _plain_segments(template, persona, history)
    return _chat_segments(template, persona, history, tokenizer, render_chat or apply_chat_template)


def render_prompt(template: PromptTemplate, persona: Sequence[str], history: Sequence[str], tokenizer: Any = None) -> str:
    """The prompt as one string (the end-of-turn text follows every earlier model response)."""
    segments = prompt_segments(template, persona, history, tokenizer)
    eot = end_of_turn_text(template, tokenizer) if len(segments) > 1 else ""
    return "".join(text + (eot if i % 2 else "") for i, text in enumerate(segments))


def _plain_segments(template: PromptTemplate, persona: Sequence[str], history: Sequence[str]) -> list[str]:
    segments: list[str] = []
    context = template.persona_block(persona) + template.separator
    for speaker, text in zip(history_speakers(len(history)), history):
        if speaker == MODEL:
            segments += [context + template.model_label, text]
            context = template.separator
        else:
            context += template.partner_label + text + template.separator
    return segments + [context + template.model_label]


def chat_messages(template: PromptTemplate, persona: Sequence[str], history: Sequence[str]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": template.persona_block(persona)}]
    for speaker, text in zip(history_speakers(len(history)), history):
        messages.append({"role": "assistant" if speaker == MODEL else "user", "content": text})
    return messages


def apply_chat_template(tokenizer: Any, messages: list[dict[str, str]]) -> str:
    """The tokenizer's chat template applied to `messages`, ending with the generation prompt."""
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise TemplateError("a chat template needs a tokenizer that has a chat_template")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_segments(
    template: PromptTemplate, persona: Sequence[str], history: Sequence[str], tokenizer: Any, render_chat: ChatRenderer
) -> list[str]:
    messages = chat_messages(template, persona, history)
    eot = end_of_turn_text(template, tokenizer)
    segments: list[str] = []
    consumed = ""  # the text the segments so far stand for
    for cut in [i for i, m in enumerate(messages) if m["role"] == "assistant"] + [len(messages)]:
        prompt = render_chat(tokenizer, messages[:cut])
        if not prompt.startswith(consumed):
            raise TemplateError(
                f"the chat template does not extend the previous prompt at message {cut}: expected it to start with "
                f"...{consumed[-80:]!r} + end of turn {eot!r}, got ...{prompt[max(0, len(consumed) - 80):len(consumed) + 20]!r}"
            )
        segments.append(prompt[len(consumed):])
        if cut < len(messages):
            response = messages[cut]["content"]
            segments.append(response)
            consumed = prompt + response + eot
    return segments
