"""How a chat request's messages become prompt ids: through a chat template (the tokenizer's, or
Jinja text given with --chat-template), or through one of the project's persona templates
(--template), which builds the prompt exactly as training and `pdpo generate` build it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pdpo_jax.data.dialogue import MODEL, history_speakers
from pdpo_jax.data.templates import TemplateError
from pdpo_jax.data.tokenization import PromptEncoder
from pdpo_jax.serve.protocol import ApiError

Renderer = Callable[[list[dict[str, str]]], list[int]]


def chat_renderer(tokenizer: Any, template: str | None = None) -> Renderer:
    """messages -> prompt ids through the tokenizer's chat template (or `template`, Jinja text)."""

    def render(messages: list[dict[str, str]]) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True)
        except Exception as err:  # noqa: BLE001 - a template refusing the conversation is the client's input
            raise ApiError(422, f"messages: the chat template cannot render them: {err}", param="messages") from None
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])

    return render


def persona_renderer(encoder: PromptEncoder) -> Renderer:
    """messages -> prompt ids as the persona template of `encoder` builds them for training: a first
    system message holds the persona, one fact per line; the user (partner) and assistant (model)
    messages after it are the dialogue, which ends with the user line to answer."""

    def render(messages: list[dict[str, str]]) -> list[int]:
        persona: list[str] = []
        first = 0
        if messages[0]["role"] == "system":
            persona = [line.strip() for line in messages[0]["content"].splitlines() if line.strip()]
            first = 1
        turns = messages[first:]
        if not turns:
            raise ApiError(422, "messages: a persona template needs a user message to answer", param="messages")
        for number, (message, speaker) in enumerate(zip(turns, history_speakers(len(turns))), start=first):
            expected = "assistant" if speaker == MODEL else "user"
            if message["role"] != expected:
                raise ApiError(422, f"messages[{number}].role: with a persona template the messages after the "
                               f"system message alternate user and assistant and end with user; expected "
                               f"{expected}, got {message['role']}", param=f"messages[{number}].role")
        try:
            return encoder.prompt_ids(persona, [message["content"] for message in turns])
        except TemplateError as err:
            raise ApiError(422, f"messages: the persona template cannot render them: {err}", param="messages") from None

    return render
