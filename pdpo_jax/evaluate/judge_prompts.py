"""What the judge is asked and how its answer is read: prompts (English, Japanese), verdict parsing,
and the rule that combines the verdicts of the two presentation orders."""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal, Sequence

Outcome = Literal["win", "draw", "lose"]  # always from model A's side
Message = dict[str, str]


# --------------------------------------------------------------------------------------------
# Prompts


@dataclass(frozen=True)
class JudgePrompt:
    """Everything language-specific about asking for one verdict."""

    instructions: str  # what to judge and how; human annotators read the same text
    output_format: str  # how the judge writes its answer
    user_template: str  # fields: persona, history, response_1, response_2
    speaker_label: str  # the persona's owner, who says the judged response
    partner_label: str
    empty_history: str
    reask: str  # sent after an answer without a verdict

    @property
    def system(self) -> str:
        return f"{self.instructions}\n\n{self.output_format}"


_INSTRUCTIONS_EN = """\
You are an impartial judge of persona-grounded open-domain dialogue. You are given the persona of \
a speaker (sentences describing who the speaker is), the dialogue so far, and two candidate \
responses that the speaker could say next. Decide which response better fulfils the persona and \
is preferable as the speaker's next turn.

Criteria, most important first:
1. Persona consistency: the response must not contradict any persona sentence. Naturally \
reflecting the persona where it fits is a plus; claiming facts that conflict with the persona is \
a serious fault, even if the response is otherwise fluent.
2. Response quality: coherent with the dialogue so far, relevant to the partner's last turn, \
fluent, natural and engaging as casual conversation.

Avoid these biases:
- Position: the order in which the two responses are shown must not influence your decision.
- Length: do not prefer a response because it is longer or shorter; judge what it says.
- Names: the labels "Response 1" and "Response 2" carry no meaning; ignore any names, and do not \
guess or consider which system wrote a response."""

_OUTPUT_FORMAT_EN = """\
First write a brief explanation that compares the two responses on the criteria. Then end your \
answer with the verdict on its own line, in exactly this format: "[[1]]" if Response 1 is \
better, "[[2]]" if Response 2 is better, "[[3]]" if they are equally good or equally bad (a tie). \
The verdict must be the last thing you write."""

_USER_EN = """\
[Persona of the speaker]
{persona}

[Dialogue so far]
{history}

[Response 1]
{response_1}
[End of Response 1]

[Response 2]
{response_2}
[End of Response 2]

Which response better fulfils the persona and is preferable as the speaker's next turn? Explain \
first, then give your verdict as [[1]], [[2]] or [[3]] on the last line."""

_INSTRUCTIONS_JA = """\
あなたはペルソナに基づく雑談対話を評価する公平な審査員です。話者のペルソナ（話者がどんな人物かを説明する文）、\
ここまでの対話、そして話者が次に言いうる二つの応答候補が与えられます。どちらの応答がペルソナをよりよく満たし、\
話者の次の発話として望ましいかを判定してください。

評価基準（重要な順）:
1. ペルソナとの一貫性: 応答はどのペルソナ文とも矛盾してはいけません。自然な形でペルソナを反映していれば加点です。\
ペルソナと食い違う事実を述べることは、応答がほかの点で流暢であっても重大な欠点です。
2. 応答の質: ここまでの対話と整合し、相手の直前の発話に関連しており、流暢で自然な、雑談として魅力のある応答であること。

次の偏りを避けてください:
- 位置: 二つの応答が示される順番を判定に影響させないこと。
- 長さ: 長い・短いという理由で応答を選ばないこと。内容で判断すること。
- 名前: 「応答1」「応答2」というラベルに意味はありません。名前は無視し、どのシステムが書いた応答かを推測・考慮しないこと。"""

_OUTPUT_FORMAT_JA = """\
まず二つの応答を評価基準に沿って比較する短い説明を書いてください。そのあと最後の行に、判定を次の形式どおりに書いてください: \
応答1が良ければ「[[1]]」、応答2が良ければ「[[2]]」、同程度に良い、または同程度に悪ければ（引き分け）「[[3]]」。\
判定は必ず回答の最後に書いてください。"""

_USER_JA = """\
【話者のペルソナ】
{persona}

【ここまでの対話】
{history}

【応答1】
{response_1}
【応答1ここまで】

【応答2】
{response_2}
【応答2ここまで】

どちらの応答がペルソナをよりよく満たし、話者の次の発話として望ましいですか。まず説明を書き、最後の行に \
[[1]]、[[2]]、[[3]] のいずれかで判定を書いてください。"""

PROMPTS: dict[str, JudgePrompt] = {
    "en": JudgePrompt(
        instructions=_INSTRUCTIONS_EN,
        output_format=_OUTPUT_FORMAT_EN,
        user_template=_USER_EN,
        speaker_label="Speaker",
        partner_label="Partner",
        empty_history="(no previous turns: the speaker opens the conversation)",
        reask="Your answer did not end with a verdict in the required format. Give your final "
        "verdict now, replying with exactly one of [[1]], [[2]] or [[3]].",
    ),
    "ja": JudgePrompt(
        instructions=_INSTRUCTIONS_JA,
        output_format=_OUTPUT_FORMAT_JA,
        user_template=_USER_JA,
        speaker_label="話者",
        partner_label="相手",
        empty_history="（これまでの発話はありません。話者が会話を始めます）",
        reask="回答の最後に所定の形式の判定がありませんでした。最終判定を [[1]]、[[2]]、[[3]] の"
        "いずれか一つだけで答えてください。",
    ),
}


def prompt_for(language: str) -> JudgePrompt:
    if language not in PROMPTS:
        raise ValueError(f"unknown judge language {language!r}; choose one of {sorted(PROMPTS)}")
    return PROMPTS[language]


def format_history(history: Sequence[str], prompt: JudgePrompt) -> str:
    """Label turns counting back from the end: the last turn is the partner's, the speaker answers it."""
    if not history:
        return prompt.empty_history
    return "\n".join(f"{label}: {turn}" for label, turn in zip(history_labels(len(history), prompt), history))


def history_labels(turns: int, prompt: JudgePrompt) -> list[str]:
    """Who said each of `turns` history turns, oldest first: the last is the partner's."""
    return [prompt.partner_label if (turns - 1 - i) % 2 == 0 else prompt.speaker_label for i in range(turns)]


def build_messages(
    prompt: JudgePrompt, persona: Sequence[str], history: Sequence[str], response_1: str, response_2: str
) -> list[Message]:
    user = prompt.user_template.format(
        persona="\n".join(f"- {line}" for line in persona),
        history=format_history(history, prompt),
        response_1=response_1,
        response_2=response_2,
    )
    return [{"role": "system", "content": prompt.system}, {"role": "user", "content": user}]


def reask_messages(prompt: JudgePrompt, messages: Sequence[Message], answer: str) -> list[Message]:
    return [*messages, {"role": "assistant", "content": answer}, {"role": "user", "content": prompt.reask}]


# --------------------------------------------------------------------------------------------
# Verdicts and how two orders combine

_VERDICT = re.compile(r"\[\[\s*([123])\s*\]\]")


def parse_verdict(text: str) -> int | None:
    """The last [[1]]/[[2]]/[[3]] in the text; NFKC first so full-width brackets and digits count."""
    found = _VERDICT.findall(unicodedata.normalize("NFKC", text or ""))
    return int(found[-1]) if found else None


def verdict_to_outcome(verdict: int, a_first: bool) -> Outcome:
    if verdict == 3:
        return "draw"
    return "win" if (verdict == 1) == a_first else "lose"


def combine_orders(first: Outcome, second: Outcome) -> Outcome:
    """Agreement keeps the outcome; a decision plus a tie keeps the decision; win vs lose is a draw."""
    if first == second:
        return first
    if first == "draw":
        return second
    if second == "draw":
        return first
    return "draw"
