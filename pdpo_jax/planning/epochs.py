"""How many items one epoch of each stage covers: counted from the config's data files when they
are on disk (with the readers the stages use), else taken from the published sizes of the paper's
corpora, and always said which.

One training example is one model turn. SFT (`packing: turn`) has a row per example, make-prefs
samples one negative per example and DPO trains on one pair per example; eval-dnli scores each
DNLI example once.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.config import RunConfig
from pdpo_jax.data import examples_from_dialogues
from pdpo_jax.data.corpus import prepare_corpus
from pdpo_jax.data.dnli import read_dnli

# ConvAI2 PersonaChat, "self" persona, original: the train split ParlAI distributes.
PERSONACHAT_TRAIN = {"dialogues": 8939, "examples": 65719,
                     "source": "published size of ConvAI2 PersonaChat train_self_original (8,939 dialogues, "
                               "65,719 model turns)"}
# JPersonaChat (Sugiyama et al.): 5,000 dialogues, 61,793 utterances (as tabulated in the
# RealPersonaChat README). The model plays one speaker, so about half the utterances are its turns.
JPERSONACHAT = {"dialogues": 5000, "utterances": 61793}


@dataclass(frozen=True)
class EpochSizes:
    train_examples: int
    train_dialogues: int | None  # None: not known (--examples)
    dnli_examples: int | None  # None: no DNLI files configured, or their size is not known
    source: str

    def describe(self) -> str:
        dnli = "DNLI examples not counted" if self.dnli_examples is None else f"{self.dnli_examples:,} DNLI examples"
        dialogues = "" if self.train_dialogues is None else f" in {self.train_dialogues:,} dialogues"
        return f"{self.train_examples:,} training examples{dialogues}, {dnli} ({self.source})"


def _all_exist(paths: list[str]) -> bool:
    return bool(paths) and all(Path(p).is_file() for p in paths)


def _dnli_count(run: RunConfig) -> tuple[int | None, str]:
    if not run.eval.dnli:
        return None, "no eval.dnli files"
    if _all_exist(run.eval.dnli):
        count = sum(len(read_dnli(path, run.eval.protocol)) for path in run.eval.dnli)
        return count, "DNLI examples counted in eval.dnli"
    return None, "eval.dnli files not on disk, so DNLI time is given per 1,000 examples"


def _published(run: RunConfig) -> tuple[int, int, str]:
    names = " ".join(run.data.train).lower()
    if "jpersonachat" in names or "japanese_persona_chat" in names:
        share = run.data.split_fractions[0]
        dialogues = round(JPERSONACHAT["dialogues"] * share)
        examples = round(JPERSONACHAT["utterances"] / 2 * share)
        return examples, dialogues, (f"assumed from JPersonaChat's published size ({JPERSONACHAT['dialogues']:,} dialogues, "
                                     f"{JPERSONACHAT['utterances']:,} utterances): half the utterances are the model's "
                                     f"turns, {share:g} of them in the train split")
    if "personachat" in names or "self_original" in names:
        return PERSONACHAT_TRAIN["examples"], PERSONACHAT_TRAIN["dialogues"], PERSONACHAT_TRAIN["source"]
    raise ValueError(f"data.train {run.data.train} is not on disk and is not a corpus of known size; "
                     "give the number of training examples with --examples N")


def epoch_sizes(run: RunConfig, examples: int | None = None) -> EpochSizes:
    """The sizes of `run`'s epochs; `examples` overrides the training-example count."""
    dnli, dnli_source = _dnli_count(run)
    if examples is not None:
        return EpochSizes(examples, None, dnli, f"--examples {examples:,}; {dnli_source}")
    if _all_exist(run.data.train) and (not run.data.val or _all_exist(run.data.val)):
        corpus = prepare_corpus(run.data, run.seed)
        count = len(examples_from_dialogues(corpus.train))
        return EpochSizes(count, len(corpus.train), dnli, f"counted in data.train; {dnli_source}")
    count, dialogues, source = _published(run)
    return EpochSizes(count, dialogues, dnli, f"{source}; {dnli_source}")
