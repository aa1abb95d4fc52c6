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


def source_dialogues(normalized_turns, example):
    """The dialogues that open with the example's prefix and gold, utterance by utterance
    (`normalized_turns`: (dialogue id, its normalized utterances) pairs)."""
    wanted = [normalize_utterance(u) for u in (*example.history, example.gold)]
    return {dialogue_id for dialogue_id, turns in normalized_turns if turns[: len(wanted)] == wanted}


def test_overlap_filter_on_staged_data(shared_data):
    """Validation: every dialogue an example was cut from goes, and little else; train (another
    split) loses nothing, though its generic lines meet the DNLI prefixes everywhere."""
    dnli = read_dnli(shared_data / "dnli/valid_havenot.jsonl") + read_dnli(shared_data / "dnli/valid_likedislike.jsonl")
    val = load_dialogues(shared_data / "personachat/valid_self_original_no_cands.txt")
    kept, report = drop_overlapping(val, dnli)
    print(f"\nDNLI overlap filter, validation: {report.summary()}")
    assert report.dialogues_kept == len(kept) == 703 and report.dialogues_in == 1000
    assert report.examples_matched == len(dnli) == 454  # every example's source was found and dropped
    dropped = set(report.dropped_ids)
    normalized_turns = [(d.id, [normalize_utterance(t.text) for t in d.turns]) for d in val]
    sources = set().union(*(source_dialogues(normalized_turns, e) for e in dnli))
    assert len(sources) == 296 and sources <= dropped  # the exact-prefix sources (one example's has a typo)
    kept_ids = {d.id for d in kept}
    assert not kept_ids & dropped
    kept_utterances = {normalize_utterance(t.text) for d in kept for t in d.turns}
    golds_left = {e.gold for e in dnli if normalize_utterance(e.gold) in kept_utterances}
    assert golds_left == {"do you have any pets ?"}  # a generic line, said in unrelated dialogues too

    train = load_dialogues(shared_data / "personachat/parallel/per-train.txt")
    kept_train, train_report = drop_overlapping(train, dnli)
    print(f"DNLI overlap filter, train: {train_report.summary()}")
    assert len(kept_train) == 1356 and train_report.examples_matched == 0
    generic = {normalize_utterance(u) for e in dnli for u in e.history}
    assert sum(any(normalize_utterance(t.text) in generic for t in d.turns) for d in train) > 500  # the old rule's losses


def test_overlap_filter_matches_both_speakers_after_normalization():
    clean = dialogue(0)
    source = Dialogue("p", ("x .",), None, (Turn(PARTNER, "I'm allergic to cats!"), Turn(MODEL, "oh no"),
                                            Turn(PARTNER, "Sorry, it's fine.")))
    generic = Dialogue("g", ("y .",), None, (Turn(PARTNER, "i am allergic to cats"), Turn(MODEL, "me too")))
    from pdpo_jax.data import DnliExample

    probe = DnliExample("e", ("x .",), ("i am allergic to cats", "Oh no!"), (("sorry , it is fine", "hits"),))
    kept, report = drop_overlapping([clean, source, generic], [probe])
    assert kept == [clean, generic] and report.dropped_ids == ("p",) and report.examples_matched == 1
    short = DnliExample("s", ("x .",), ("me too",), (("unrelated", "hits"),))  # fewer than 3: all must match
    assert drop_overlapping([generic], [short])[1].dialogues_dropped == 0
