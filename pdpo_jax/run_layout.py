"""Where every artifact of a run lives, known in one place.

    layout = RunLayout(config.run_dir)       # or RunLayout.of(config)
    layout.best_model("sft")                 # <run_dir>/sft/best
    layout.dnli_report("dpo")                # <run_dir>/eval/dpo/dnli.json

Every stage, the pipeline and the scripts ask this object for paths instead of joining names onto
the run directory themselves, so the layout on disk is written down once (and a store other than
the local disk needs only this seam). The layout is the one runs have always had:

    config.yaml                      the resolved config the run was started with
    pipeline.json                    which stages `pdpo pipeline` ran, and where its summary is
    sft/ dpo/ rl/ nli/               a training stage: checkpoints/, best/, metrics.jsonl,
                                     tensorboard/, data_summary.json, DONE
    nli/classifier/                  the NLI classifier as a Hugging Face directory (the RL reward)
    prefs/{train,val}/shard-*.jsonl  pseudo-preference shards; settings.json, summary.json, DONE
    eval/<model>/dnli.json           a trained model's Dialogue NLI ranking (+ .md, .png, DONE)
    test_responses/<model>.jsonl     a trained model's answers to the test turns; DONE
    eval_responses/<model>.json      what those answers say: C-score, contradictions, copying; DONE
    judge/                           the LLM judge on the test responses
    export/hf/                       the DPO model as a Hugging Face directory
    summary/summary.md               the run's results with its figures
    round-<k>/{prefs,dpo}/           round k >= 2 of iterative DPO (`dpo.rounds`): its pseudo-preferences
                                     and DPO, laid out as prefs/ and dpo/ (round 1 is prefs/ and dpo/)
    eval/dpo-round-<k>/dnli.json     an earlier round's DNLI ranking, where one was made (eval/dpo: the last round)

Which model a stage starts from is a question of the layout and the config together, answered
here too (`preference_models`, `rl_policy`, `rl_classifier`, and `dpo_round`: each round of
iterative DPO's folders, models and seeds).

A run directory may be on Cloud Storage (`run_dir=gs://bucket/runs/demo`): then `root` and every
path below it are `etils.epath` paths (`pdpo_jax.object_store.as_path`), with the same methods.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pdpo_jax.config import RunConfig
from pdpo_jax.object_store import as_path
from pdpo_jax.storage import DONE_MARKER

ROUND_FOLDER = "round-{}"  # round k >= 2 of iterative DPO, under the run directory
ROUND_PATTERN = re.compile(r"round-([0-9]+)")

# The trained models whose answers to the test turns a run keeps: folder -> name in the responses file.
RESPONDING_MODELS = {"sft": "SFT", "dpo": "PseudoDPO"}
# The run's judge compares the test responses of model A (PseudoDPO) against B (SFT).
JUDGED_MODELS = ("dpo", "sft")


@dataclass(frozen=True)
class DpoRound:
    """Round `number` of iterative DPO (`dpo.rounds`): where it writes, which models it uses, its seeds.

    Round 1 is the run's make-prefs and DPO as they have always been. Round k >= 2 samples its
    negatives with round k-1's best model (`generator`), stores the log-probs of `reference` (round
    k-1's model, or round 1's reference under `dpo.round_reference: sft`) and starts the DPO policy
    from round k-1's model (`start`)."""

    number: int
    prefs: Path  # its pseudo-preference folder
    dpo: Path  # its DPO folder
    generator: str
    reference: str
    start: str
    prefs_seed: int  # its `prefs.seed`: the donor personas and the sampling seeds
    seed: int  # its DPO seed: the order of the pairs

    @property
    def best_model(self) -> Path:
        return self.dpo / "best"

    @property
    def data_summary(self) -> Path:
        return self.dpo / "data_summary.json"

    def prefs_config(self, config: RunConfig) -> RunConfig:
        """`config` as this round's make-prefs reads it: with the round's `prefs.seed` (round 1: `config`)."""
        if self.number == 1:
            return config
        return dataclasses.replace(config, prefs=dataclasses.replace(config.prefs, seed=self.prefs_seed))


def round_seed(seed: int, number: int) -> int:
    """Round `number`'s version of a seed: round 1 keeps it, round k >= 2 takes 31 bits of a sha256
    of the seed and k, so no two rounds share donor personas, sampling seeds or pair order."""
    if number == 1:
        return seed
    digest = hashlib.sha256(f"pdpo-round\x00{seed}\x00{number}".encode()).digest()
    return int.from_bytes(digest[:4], "big") >> 1


@dataclass(frozen=True)
class RunLayout:
    """The paths of one run directory; building one touches nothing on disk."""

    root: Path  # or an epath path on gs://

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", as_path(self.root))

    @classmethod
    def of(cls, config: RunConfig) -> "RunLayout":
        return cls(config.run_dir)

    # ---------------------------------------------------------------- the run as a whole

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def pipeline_record(self) -> Path:
        return self.root / "pipeline.json"

    # ---------------------------------------------------------------- training stages

    def stage(self, name: str) -> Path:
        """A stage's folder (`sft`, `dpo`, `rl`, `nli`, `prefs`, ...)."""
        return self.root / name

    def best_model(self, stage: str) -> Path:
        return self.stage(stage) / "best"

    def metrics(self, stage: str) -> Path:
        return self.stage(stage) / "metrics.jsonl"

    def data_summary(self, stage: str) -> Path:
        return self.stage(stage) / "data_summary.json"

    def done(self, stage: str) -> Path:
        """A stage's DONE marker, written last (`pdpo_jax.storage.mark_done`)."""
        return self.stage(stage) / DONE_MARKER

    # ---------------------------------------------------------------- pseudo-preferences

    @property
    def prefs(self) -> Path:
        return self.stage("prefs")

    def prefs_split(self, split: str) -> Path:
        """The folder of a split's shards (`train` or `val`)."""
        return self.prefs / split

    @property
    def prefs_summary(self) -> Path:
        return self.prefs / "summary.json"

    # ---------------------------------------------------------------- the RL(DialogueNLI) baseline

    @property
    def nli(self) -> Path:
        return self.stage("nli")

    @property
    def nli_classifier(self) -> Path:
        """The classifier as a Hugging Face directory: what `pdpo rl` and `pdpo eval-nli` read."""
        return self.nli / "classifier"

    @property
    def nli_classifier_files(self) -> Path:
        """The classifier's config.json and tokenizer, which `nli/best` is written beside."""
        return self.nli / "classifier_files"

    # ---------------------------------------------------------------- evaluation

    def evaluation(self, model: str) -> Path:
        """The DNLI evaluation folder of a training stage's best model."""
        return self.root / "eval" / model

    def dnli_report(self, model: str) -> Path:
        return self.evaluation(model) / "dnli.json"

    @property
    def test_responses(self) -> Path:
        return self.root / "test_responses"

    def responses(self, model: str) -> Path:
        """A trained model's answers to the test turns (`sft.jsonl`, `dpo.jsonl`)."""
        return self.test_responses / f"{model}.jsonl"

    @property
    def response_metrics_dir(self) -> Path:
        """`pdpo eval-responses` of a run: one report per model's test responses, a table, DONE."""
        return self.root / "eval_responses"

    def response_metrics(self, model: str) -> Path:
        """The C-score, contradiction, persona-copy, distinct-n and length report of a model's test responses."""
        return self.response_metrics_dir / f"{model}.json"

    @property
    def judge(self) -> Path:
        return self.root / "judge"

    @property
    def judge_results(self) -> Path:
        return self.judge / "judge_results.json"

    @property
    def export(self) -> Path:
        return self.root / "export"

    @property
    def exported_model(self) -> Path:
        return self.export / "hf"

    @property
    def summary(self) -> Path:
        return self.root / "summary"

    @property
    def summary_markdown(self) -> Path:
        return self.summary / "summary.md"

    # ---------------------------------------------------------------- which model a stage starts from

    def preference_models(self, config: RunConfig) -> tuple[str, str]:
        """(generator, reference) of make-prefs, which is also DPO's start and reference: as
        configured, else the best model of `prefs.from_stage` (SFT, or the RL baseline for
        "+RL(DialogueNLI) +PseudoDPO")."""
        start = os.fspath(self.best_model(config.prefs.from_stage))
        return config.prefs.generator or start, config.prefs.reference or start

    # ---------------------------------------------------------------- iterative DPO (dpo.rounds)

    def round_folder(self, number: int) -> Path:
        """Where round `number` keeps its prefs/ and dpo/: the run directory itself for round 1."""
        return self.root if number == 1 else self.root / ROUND_FOLDER.format(number)

    def round_best_model(self, number: int) -> Path:
        """Round `number`'s best DPO model: `dpo/best` for round 1, `round-<k>/dpo/best` after it."""
        return self.round_folder(number) / "dpo" / "best"

    def round_dnli_report(self, number: int, rounds: int) -> Path:
        """Round `number`'s DNLI ranking: eval/dpo for the last of `rounds`, eval/dpo-round-<k> before it."""
        return self.dnli_report("dpo" if number == rounds else f"dpo-round-{number}")

    def rounds_on_disk(self) -> list[int]:
        """The rounds this run has folders of: 1 (prefs/, dpo/), then every round-<k>/ in order."""
        later = sorted(int(m.group(1)) for p in (self.root.iterdir() if self.root.is_dir() else ())
                       if p.is_dir() and (m := ROUND_PATTERN.fullmatch(p.name)) and int(m.group(1)) > 1)
        return [1, *later] if later or self.stage("dpo").is_dir() else []

    def dpo_round(self, config: RunConfig, number: int) -> DpoRound:
        """Round `number` of the run's iterative DPO (1 <= number <= dpo.rounds)."""
        if not 1 <= number <= config.dpo.rounds:
            raise ValueError(f"round {number} is not one of the run's {config.dpo.rounds} (dpo.rounds)")
        first_generator, first_reference = self.preference_models(config)
        if number == 1:
            return DpoRound(1, self.prefs, self.stage("dpo"), first_generator, first_reference, first_reference,
                            config.prefs.seed, config.seed)
        previous = os.fspath(self.round_best_model(number - 1))
        reference = previous if config.dpo.round_reference == "previous" else first_reference
        folder = self.round_folder(number)
        return DpoRound(number, folder / "prefs", folder / "dpo", previous, reference, previous,
                        round_seed(config.prefs.seed, number), round_seed(config.seed, number))

    def trained_model(self, config: RunConfig, stage: str) -> Path:
        """The best model a training stage leaves for evaluation, test responses and export: the
        last round's for "dpo" (`dpo.rounds`), `<stage>/best` for the others."""
        return self.round_best_model(config.dpo.rounds) if stage == "dpo" else self.best_model(stage)

    def rl_policy(self, config: RunConfig) -> Path:
        """PPO's start and KL reference: `rl.policy`, else the SFT model."""
        return as_path(config.rl.policy) if config.rl.policy else self.best_model("sft")

    def rl_classifier(self, config: RunConfig) -> Path:
        """PPO's reward model: `rl.classifier`, else the run's NLI classifier."""
        return as_path(config.rl.classifier) if config.rl.classifier else self.nli_classifier
