"""The annotation page's words, in the study's language. The instructions are the LLM judge's own
(`pdpo_jax.evaluate.judge_prompts`) without the sentences about its output format, so people and
judge are asked the same question; the history's speaker labels are the judge's too."""

from __future__ import annotations

from typing import Sequence

from pdpo_jax.evaluate.judge_prompts import history_labels, prompt_for

_LABELS = {
    "en": {
        "title": "Which response fits the persona better?",
        "instructions_title": "Instructions",
        "persona": "Persona of the speaker",
        "history": "Dialogue so far",
        "response_1": "Response 1",
        "response_2": "Response 2",
        "choose_1": "Response 1 is better",
        "choose_2": "Response 2 is better",
        "choose_draw": "Draw",
        "previous": "Previous",
        "next": "Next",
        "keys": "Keys: 1 = response 1, 2 = response 2, 3 or D = draw, ← / → = previous / next item.",
        "item": "Item {position} of {total}",
        "voted": "Your vote on this item: {choice}. Choose again to change it.",
        "done": "You have voted on every item, thank you. You may go back and change a vote.",
        "saving": "Saving…",
        "failed": "Your vote was not saved: {error}. Please try again.",
    },
    "ja": {
        "title": "どちらの応答がペルソナにより合っていますか",
        "instructions_title": "評価の指示",
        "persona": "話者のペルソナ",
        "history": "ここまでの対話",
        "response_1": "応答1",
        "response_2": "応答2",
        "choose_1": "応答1が良い",
        "choose_2": "応答2が良い",
        "choose_draw": "引き分け",
        "previous": "前へ",
        "next": "次へ",
        "keys": "キー: 1 = 応答1、2 = 応答2、3 または D = 引き分け、← / → = 前 / 次の項目。",
        "item": "{total} 件中 {position} 件目",
        "voted": "この項目へのあなたの判定: {choice}。選び直すと変更できます。",
        "done": "すべての項目を判定しました。ありがとうございました。前に戻って判定を変更することもできます。",
        "saving": "保存しています…",
        "failed": "判定を保存できませんでした: {error}。もう一度お試しください。",
    },
}


def page_text(language: str) -> dict[str, str]:
    """Every text the page shows besides the data, plus the judge's instructions."""
    prompt = prompt_for(language)
    return {**_LABELS[language], "instructions": prompt.instructions, "empty_history": prompt.empty_history}


def labelled_history(history: Sequence[str], language: str) -> list[dict[str, str]]:
    """The history's turns with who said each, as the judge sees them."""
    return [{"speaker": label, "text": turn}
            for label, turn in zip(history_labels(len(history), prompt_for(language)), history)]
