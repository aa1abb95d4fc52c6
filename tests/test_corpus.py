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
