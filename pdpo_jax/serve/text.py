"""Token ids to text as they arrive, cut at stop strings, sent only once it can no longer change.

Each new id re-decodes the whole sequence (a few hundred ids; cheap next to a model step), so a
multi-byte character split over tokens and tokenizers that merge spaces come out as a full
decode would. What is held back until the next token: a trailing incomplete character
(decoded as U+FFFD) and a tail that could still become a stop string.
"""

from __future__ import annotations

from typing import Any

INCOMPLETE = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = ()):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0
        self.stopped = False

    def add(self, token_id: int) -> bool:
        """Appends a token; True when the text now contains a stop string (cut before it)."""
        self.ids.append(int(token_id))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [at for at in (text.find(s) for s in self.stop) if at >= 0]
        if cuts:
            text, self.stopped = text[: min(cuts)], True
        self.text = text
        return self.stopped

    def ready(self, final: bool = False) -> str:
        """The text not sent yet that is safe to send (everything, when `final`)."""
        end = len(self.text)
        if not final and not self.stopped:
            while end > self.sent and self.text[end - 1] == INCOMPLETE:
                end -= 1
            end = min(end, self._before_possible_stop())
        piece = self.text[self.sent : max(end, self.sent)]
        self.sent = max(end, self.sent)
        return piece

    def _before_possible_stop(self) -> int:
        """Where a tail of the text that is the start of some stop string begins (its length if none)."""
        for start in range(max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1), len(self.text)):
            tail = self.text[start:]
            if any(s.startswith(tail) for s in self.stop):
                return start
        return len(self.text)
