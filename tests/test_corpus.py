from pathlib import Path

from pdpo_jax.config import load_config
from pdpo_jax.data import normalize_utterance, read_dnli
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.data.overlap import example_utterances, shares_an_example


def test_staged_corpus_is_clean_of_dnli_dialogues_and_split_by_dialogue(shared_data):
    dnli_files = [str(shared_data / "dnli" / name) for name in ("valid_havenot.jsonl", "valid_likedislike.jsonl")]
    config = load_config(None, [
        f"data.train={shared_data / 'personachat' / 'valid_self_original_no_cands.txt'}",
        f"data.exclude_dnli={dnli_files}",
    ])
    corpus = prepare_corpus(config.data, seed=0)
    kept = corpus.train + corpus.val + corpus.test
    assert corpus.overlap.dialogues_kept == len(kept) < 1000
    assert not {d.id for d in corpus.train} & {d.id for d in corpus.val + corpus.test}
    examples = [example_utterances(ex) for path in dnli_files for ex in read_dnli(path, protocol="all")]
    for dialogue in corpus.train + corpus.val + corpus.test:
        utterances = {normalize_utterance(t.text) for t in dialogue.turns}
        assert not any(shares_an_example(utterances, example) for example in examples)
    print(f"kept {len(kept)} of 1000 dialogues: {corpus.summary()}")


def test_demo_corpus_splits(tmp_path):
    demo = Path(__file__).resolve().parents[1] / "pdpo_jax" / "resources" / "demo" / "dialogues.txt"
    config = load_config(None, [f"data.train={demo}"])
    corpus = prepare_corpus(config.data, seed=0)
    assert len(corpus.train) + len(corpus.val) + len(corpus.test) == 30 and corpus.val


def test_train_split_with_clean_validation_and_held_out_test_dialogues(shared_data):
    """The reproduction layout: train on the staged train split, select on validation dialogues the
    DNLI set was not cut from, keep some of those apart as test dialogues."""
    parallel = shared_data / "personachat" / "parallel"
    dnli_files = [str(shared_data / "dnli" / name) for name in ("valid_havenot.jsonl", "valid_likedislike.jsonl")]
    config = load_config(None, [
        f"data.train={parallel / 'per-train.txt'}", f"data.val={parallel / 'per-val.txt'}",
        f"data.exclude_dnli={dnli_files}", "data.test_fraction=0.2", "data.max_val_dialogues=30",
    ])
    corpus = prepare_corpus(config.data, seed=0)
    assert len(corpus.train) == 1356 and len(corpus.val) == 30
    assert 100 < len(corpus.test) < 200  # about a fifth of the 703 clean validation dialogues
    ids = [{d.id for d in part} for part in (corpus.train, corpus.val, corpus.test)]
    assert not ids[0] & ids[1] and not ids[0] & ids[2] and not ids[1] & ids[2]
    assert corpus.overlap.dialogues_dropped == 297 and corpus.overlap.examples_matched == 454
    again = prepare_corpus(config.data, seed=0)
    assert [d.id for d in again.test] == [d.id for d in corpus.test]  # a stable split
