"""Examples, by-dialogue splits, and the DNLI overlap filter."""

from __future__ import annotations

import pytest

from pdpo_jax.data import (
    MODEL,
    PARTNER,
    Dialogue,
    Turn,
    drop_overlapping,
    examples_from_dialogues,
    load_dialogues,
    normalize_utterance,
    read_dnli,
    split_dialogues,
)


def dialogue(i: int, n_turns: int = 4, opener: str = PARTNER, partner_persona=None) -> Dialogue:
    speakers = [opener, MODEL if opener == PARTNER else PARTNER] * n_turns
    turns = tuple(Turn(s, f"utterance {k} of {i}") for k, s in enumerate(speakers[:n_turns]))
    return Dialogue(f"d{i}", (f"persona {i} .",), partner_persona, turns)


def test_examples_one_per_model_turn_with_full_history():
    examples = examples_from_dialogues([dialogue(0, 5), dialogue(1, 3, opener=MODEL)])
    assert [e.id for e in examples] == ["d0#1", "d0#3", "d1#0", "d1#2"]
    second = examples[1]
    assert second.history == ("utterance 0 of 0", "utterance 1 of 0", "utterance 2 of 0")
    assert second.response == "utterance 3 of 0" and second.dialogue_id == "d0" and second.persona == ("persona 0 .",)
    assert second.history_speakers == (PARTNER, MODEL, PARTNER)
    assert examples[2].history == () and examples[3].history_speakers == (MODEL, PARTNER)


def test_split_is_deterministic_stable_and_keeps_views_together():
    dialogues = [dialogue(i, partner_persona=("other .",)) for i in range(400)]
    with_views = [v for d in dialogues for v in (d, d.swapped())]
    train, val, test = split_dialogues(with_views, (0.8, 0.1, 0.1), seed=3)
    assert len(train) + len(val) + len(test) == 800
    assert 560 < len(train) < 720 and len(val) > 20 and len(test) > 20
    for part in (train, val, test):  # both views of a conversation land in the same part
        assert {d.conversation_id for d in part}.isdisjoint(
            {d.conversation_id for other in (train, val, test) if other is not part for d in other}
        )
    assert split_dialogues(list(reversed(with_views)), (0.8, 0.1, 0.1), seed=3)[1] == list(reversed(val))
    more = split_dialogues(with_views + [dialogue(i) for i in range(400, 500)], (0.8, 0.1, 0.1), seed=3)
    assert set(d.id for d in val) <= set(d.id for d in more[1])  # adding dialogues moves none
    assert split_dialogues(with_views, (0.8, 0.1, 0.1), seed=4)[1] != val
    assert split_dialogues(with_views, (1.0, 0.0), seed=0) == (with_views, [])
    with pytest.raises(ValueError, match="sum to 1"):
        split_dialogues(with_views, (0.5, 0.4))


@pytest.mark.parametrize(
    "raw, normalized",
    [
        ("I'm sure it's fine , isn't it ?", "i am sure it is fine is not it"),
        ("we're here ! you've got it . they'll come . i'd go .", "we are here you have got it they will come i would go"),
        ("i can't , i won't . i cannot", "i can not i will not i can not"),
        ("  Hello   WORLD !!! ", "hello world"),
        ("john's car , let's go", "john s car let us go"),
    ],
)
def test_normalize_utterance(raw, normalized):
    assert normalize_utterance(raw) == normalized


def test_overlap_filter_on_staged_data(shared_data):
    dialogues = load_dialogues(shared_data / "personachat/valid_self_original_no_cands.txt")
    dnli = read_dnli(shared_data / "dnli/valid_havenot.jsonl") + read_dnli(shared_data / "dnli/valid_likedislike.jsonl")
    kept, report = drop_overlapping(dialogues, dnli)
    print(f"\nDNLI overlap filter: {report.summary()}")
    assert report.dialogues_kept == len(kept) and 0 < len(kept) < 1000
    assert report.dialogues_kept + report.dialogues_dropped == 1000 == report.dialogues_in
    banned = {normalize_utterance(e.gold) for e in dnli} | {normalize_utterance(h) for e in dnli for h in e.history}
    for example in examples_from_dialogues(kept):
        assert all(normalize_utterance(text) not in banned for text in example.history + (example.response,))
    # every DNLI gold response was found in (and removed with) some dropped dialogue
    dropped = {d.id for d in dialogues} - {d.id for d in kept}
    dropped_utterances = {normalize_utterance(t.text) for d in dialogues if d.id in dropped for t in d.turns}
    assert all(normalize_utterance(e.gold) in dropped_utterances for e in dnli)


def test_overlap_filter_matches_both_speakers_after_normalization():
    clean = dialogue(0)
    partner_side = Dialogue("p", ("x .",), None, (Turn(PARTNER, "I'm allergic to cats!"), Turn(MODEL, "oh no")))
    from pdpo_jax.data import DnliExample

    probe = DnliExample("e", ("x .",), ("i am allergic to cats",), (("unrelated gold", "hits"),))
    kept, report = drop_overlapping([clean, partner_side], [probe])
    assert kept == [clean] and report.dropped_ids == ("p",) and report.dialogues_kept == 1
