"""Run configuration: dataclasses for every stage, YAML files, dotted command-line overrides.

A config file is YAML whose top-level keys are the sections below. `base: other.yaml` (a path
relative to the file) merges the file onto another one, so a variant such as "w/o shuffle" is a
two-line override file. Command-line overrides are `section.key=value` with YAML-typed values.
Unknown keys are errors that name the file (or override) and the key: a typo never silently falls
back to a default. A file is read in bounded time and memory whatever it holds: YAML aliases may not
expand past MAX_CONFIG_VALUES values nor nest deeper than MAX_CONFIG_DEPTH, and an error message
shows a value cut short (`errors.shown`), never the whole of it.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from pdpo_jax.errors import InvalidSetting, PdpoError, require, shown


class ConfigError(PdpoError):
    """A config file or override that cannot be used; the message names where and which key."""


# A real config holds a few hundred values; these bounds refuse an "alias bomb" (nine aliases of
# nine aliases of ... a 600-byte file that stands for billions of values) before anything walks it.
MAX_CONFIG_VALUES = 100_000  # lists, mappings and scalars of one file or override, aliases expanded
MAX_CONFIG_DEPTH = 64  # lists and mappings inside one another


# Every section checks its own fields in `__post_init__`, so a section is valid wherever it was
# built: from a file, an override or code. A check names keys in braces (`"{beta} must be
# positive"`); `load_config` writes them under the section's dotted path (`dpo.beta`), and a
# section built in code under its `label`. (No rule couples two sections today; one that did would
# be checked in `load_config`, after every section is built.)


def _require_positive(section: Any, *keys: str) -> None:
    for key in keys:
        value = getattr(section, key)
        require(value > 0, f"{{{key}}} must be positive", section.label, got=value)


Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = ("cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = 1e-5
    schedule: Schedule = "cosine"
    warmup_ratio: float = 0.05
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.1
    max_grad_norm: float | None = 1.0  # None: no clipping

    label: ClassVar[str] = "optimizer"

    def __post_init__(self) -> None:
        require(self.schedule in SCHEDULES, f"{{schedule}} must be one of {SCHEDULES}", self.label, got=self.schedule)
        require(self.learning_rate > 0, "{learning_rate} must be positive", self.label, got=self.learning_rate)
        require(0.0 <= self.warmup_ratio < 1.0, "{warmup_ratio} must lie in [0, 1)", self.label, got=self.warmup_ratio)
        require(self.weight_decay >= 0, "{weight_decay} must be non-negative", self.label, got=self.weight_decay)
        require(self.max_grad_norm is None or self.max_grad_norm > 0, "{max_grad_norm} must be positive or None",
                self.label, got=self.max_grad_norm)


SFT_DEFAULTS = OptimizerConfig(learning_rate=1e-5, schedule="cosine")
DPO_DEFAULTS = OptimizerConfig(learning_rate=1e-6, schedule="linear")
NLI_DEFAULTS = OptimizerConfig(learning_rate=2e-5, schedule="linear")
# TRL's PPOConfig: Adam at a constant 1.41e-5, no weight decay, no gradient clipping
RL_DEFAULTS = OptimizerConfig(learning_rate=1.41e-5, schedule="constant", warmup_ratio=0.0, weight_decay=0.0,
                              max_grad_norm=None)


@dataclass
class ModelSection:
    path: str = "default"  # an HF directory, a hub name when online, or `default` (bundled model)
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype; parameters stay fp32
    remat: bool = False
    # One scanned block instead of num_layers unrolled ones: compile time and compiler memory stop
    # growing with depth (the 7B/13B paper configs); same results, in-memory layout only.
    scan_layers: bool = False
    allow_pickle: bool = False


@dataclass
class MeshSection:
    data: int = -1  # -1: all devices not used by the other axes
    fsdp: int = 1
    tensor: int = 1


@dataclass
class DataSection:
    label: ClassVar[str] = "data"

    train: list[str] = field(default_factory=list)  # dialogue files; split into train/val/test by dialogue
    format: str = "auto"
    val: list[str] = field(default_factory=list)  # optional explicit validation files
    split_fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    exclude_dnli: list[str] = field(default_factory=list)  # drop dialogues these DNLI files were built from
    both_speakers: bool = False
    template: str = "chat-en"  # a preset name or a path to a YAML template
    max_length: int = 512
    length_bucket: int = 64  # batch lengths round up to a multiple of this (= max_length: one shape, one compile)
    on_overflow: Literal["error", "skip"] = "error"
    max_dialogues: int | None = None  # keep the first N dialogues (demos, smoke runs)
    # With explicit `val` files: the share of the (clean) validation dialogues kept apart as test
    # dialogues, never used for selection (by the stable split of split_fractions), and a cap on
    # the validation dialogues that remain (budgeted runs).
    test_fraction: float = 0.0
    max_val_dialogues: int | None = None

    def __post_init__(self) -> None:
        require(self.max_length > 8, "{max_length} is too small", self.label, got=self.max_length)
        require(len(self.split_fractions) == 3 and abs(sum(self.split_fractions) - 1) < 1e-6,
                "{split_fractions} must be three numbers summing to 1", self.label, got=self.split_fractions)


@dataclass
class TrainingSection:
    """What every training stage (sft, dpo, nli, rl) sets: its optimizer, batch, length and rhythm.
    Each stage's section extends this one with its own defaults and fields."""

    label: ClassVar[str] = "training"
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    batch_size: int = 4  # rows (sft, nli), pairs or trees (dpo), prompts per rollout (rl) of one optimizer step
    grad_accum: int = 1  # micro-batches per optimizer step
    epochs: int = 1
    max_steps: int | None = None  # stop early (budgeted runs); None = all epochs
    eval_every: int = 100  # optimizer steps between validations (and at every epoch end)
    checkpoint_every: int = 100

    def __post_init__(self) -> None:
        _require_positive(self, "batch_size", "grad_accum", "epochs", "eval_every", "checkpoint_every")
        require(self.max_steps is None or self.max_steps > 0, "{max_steps} must be positive or null", self.label,
                got=self.max_steps)


@dataclass
class SFTSection(TrainingSection):
    label: ClassVar[str] = "sft"
    optimizer: OptimizerConfig = SFT_DEFAULTS
    batch_size: int = 4
    grad_accum: int = 4
    epochs: int = 5
    packing: Literal["dialogue", "turn"] = "dialogue"


@dataclass
class SamplerSection:
    """How responses are drawn (`pdpo_jax.generation.sampler_from_config`): the negatives of
    make-prefs, the test responses and the RL rollouts each have one."""

    label: ClassVar[str] = "sampler"
    kind: Literal["greedy", "temperature", "top_k", "top_p"] = "top_p"
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 0.9

    def __post_init__(self) -> None:
        require(self.temperature > 0, "{temperature} must be positive", self.label, got=self.temperature)
        require(self.top_k >= 1, "{top_k} must be at least 1", self.label, got=self.top_k)
        require(0 < self.top_p <= 1, "{top_p} must be in (0, 1]", self.label, got=self.top_p)


# The pair filters of `prefs.filters` (docs/prefs.md, Filters), each with its settings and their
# defaults; `pdpo_jax.prefs.filters` implements them.
PAIR_FILTER_SETTINGS: dict[str, dict[str, Any]] = {
    "degenerate": {},  # a negative that is empty, the chosen response again, or cut off
    "margin": {"nats": 5.0},  # the reference already prefers chosen by more than `nats` (0: by anything)
    "copy": {"share": 0.8},  # the negative holds `share` of a donor persona sentence's word pairs
    "nli": {"classifier": None, "entailment": 0.5},  # a true persona sentence entails the negative
}


@dataclass
class PairFilterSection:
    """One entry of `prefs.filters`: a mapping `{kind: margin, nats: 3}`, or the kind alone
    (`margin`) for its default settings. Settings of another kind are refused."""

    label: ClassVar[str] = "prefs.filters"
    shorthand: ClassVar[str] = "kind"  # a plain string in the config is this key's value
    kind: str = "degenerate"
    nats: float | None = None  # margin
    share: float | None = None  # copy
    classifier: str | None = None  # nli: the classifier directory; None = <run_dir>/nli/classifier
    entailment: float | None = None  # nli: the entailment probability that drops a pair

    def __post_init__(self) -> None:
        require(self.kind in PAIR_FILTER_SETTINGS, f"{{kind}} must be one of {list(PAIR_FILTER_SETTINGS)}",
                self.label, got=self.kind)
        own = PAIR_FILTER_SETTINGS[self.kind]
        for key in ("nats", "share", "classifier", "entailment"):
            if key in own:
                if getattr(self, key) is None:
                    setattr(self, key, own[key])
            else:
                require(getattr(self, key) is None, f"{{{key}}} is not a setting of the {self.kind!r} filter",
                        self.label)
        if self.kind == "copy":
            require(0 < self.share <= 1, "{share} must lie in (0, 1]", self.label, got=self.share)
        if self.kind == "nli":
            require(0 < self.entailment <= 1, "{entailment} must lie in (0, 1]", self.label, got=self.entailment)

    def settings(self) -> dict[str, Any]:
        """The kind and its own settings, as recorded beside what the filter dropped."""
        return {"kind": self.kind, **{key: getattr(self, key) for key in PAIR_FILTER_SETTINGS[self.kind]}}


@dataclass
class PrefsSection:
    label: ClassVar[str] = "prefs"
    shuffle: bool = True  # False = the paper's "w/o shuffle" ablation
    # The stage whose best model samples the negatives, scores them as the reference and starts
    # the DPO policy, where generator / reference are not set: "rl" is "+RL(DialogueNLI) +PseudoDPO".
    from_stage: Literal["sft", "rl"] = "sft"
    generator: str | None = None  # model that samples negatives; None = <run_dir>/<from_stage>/best
    reference: str | None = None  # model whose log-probs are stored; None = <run_dir>/<from_stage>/best
    sampler: SamplerSection = field(default_factory=SamplerSection)
    max_new_tokens: int = 48
    batch_size: int = 16
    seed: int = 0
    shard_size: int = 256
    drop_degenerate: bool = False
    # How a sampling batch is laid out. "tree": a dialogue's consecutive turns nest, so each run of
    # nesting generation prompts is prefilled once (each turn still decodes on its own row) and each
    # run of nesting pairs is scored in one row, its chosen responses on the trunk and its negatives
    # as branches; a long dialogue's history is cut so that its prompts keep nesting (docs/prefs.md,
    # Truncation). "per_turn": one prefill and one scored row per example, each prompt cut on its own.
    # Where nothing is cut, the same draws and log-probs (fp32 rounding aside); the bytes differ, so a
    # folder keeps the layout it began with.
    layout: Literal["tree", "per_turn"] = "tree"
    # Filters over the stored pairs, applied in order after sampling (and again, without
    # resampling, when they change): DPO reads the pairs none of them dropped. docs/prefs.md, Filters.
    filters: list[PairFilterSection] = field(default_factory=list)

    def __post_init__(self) -> None:
        _require_positive(self, "batch_size", "shard_size", "max_new_tokens")
        kinds = [f.kind for f in self.filters]
        require(len(set(kinds)) == len(kinds), "{filters} names a filter twice", self.label, got=kinds)


DPO_FAMILY = ("sigmoid", "ipo", "hinge")  # the loss types of DPO proper (`DPOSettings`)


@dataclass
class DPOSection(TrainingSection):
    label: ClassVar[str] = "dpo"
    optimizer: OptimizerConfig = DPO_DEFAULTS
    # The preference objective (`loss_type`, a kind of `pdpo_jax.preference_loss`; docs/objectives.md)
    # and its settings, named as TRL names them. The objective's settings class checks them again
    # for code that calls the loss directly (this module stays free of jax, so `pdpo --help` starts
    # fast). `beta` is every kind's (ORPO's λ); the others apply to one family each.
    beta: float = 0.5
    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo", "orpo", "rpo"] = "sigmoid"
    label_smoothing: float = 0.0  # sigmoid only (conservative DPO)
    reference_free: bool = False  # sigmoid, ipo, hinge (simpo and orpo have no reference anyway)
    simpo_gamma: float | None = None  # simpo's target margin; None = its default (0.5)
    rpo_alpha: float | None = None  # rpo's weight of the chosen NLL; None = its default (1.0)
    batch_size: int = 4
    epochs: int = 3
    # How pairs are laid out in rows (the same log-probs, loss and gradients in each):
    #   shared:   one row [prompt | chosen | rejected] per pair; batch_size counts pairs (the paper's 4)
    #   unshared: a row [prompt | chosen] and a row [prompt | rejected] per pair (TRL's layout)
    #   tree:     one row per dialogue, its turns' pairs on one trunk (docs/design.md); batch_size
    #             counts dialogue trees, so a step holds ~7 PersonaChat pairs per tree instead of a
    #             fixed number of pairs, and an epoch has that many times fewer, larger steps.
    #             With the same learning rate that is a different optimisation, so the paper
    #             configs keep `shared`.
    layout: Literal["shared", "unshared", "tree"] = "shared"
    tree_max_length: int = 1024  # tree rows longer than this are cut at turn boundaries
    tree_max_pairs: int = 16  # pairs per tree row (fixed, so every step has one shape of per-pair arrays)
    # Iterative rounds (docs/rounds.md): round k > 1 samples fresh negatives with round k-1's best
    # model and trains from it, in <run_dir>/round-k/. Its reference is round k-1's model
    # ("previous") or round 1's reference, the SFT model by default ("sft").
    rounds: int = 1
    round_reference: Literal["previous", "sft"] = "previous"

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.beta > 0, "{beta} must be positive", self.label, got=self.beta)
        require(0.0 <= self.label_smoothing < 0.5, "{label_smoothing} must be in [0, 0.5)", self.label,
                got=self.label_smoothing)
        require(self.loss_type == "sigmoid" or self.label_smoothing == 0.0,
                f"{{label_smoothing}} applies to the 'sigmoid' loss only, not to {{loss_type}} {self.loss_type!r}",
                self.label)
        require(self.loss_type in DPO_FAMILY or not self.reference_free,
                f"{{reference_free}} applies to {list(DPO_FAMILY)}, not to {{loss_type}} {self.loss_type!r}",
                self.label)
        for key, kind in (("simpo_gamma", "simpo"), ("rpo_alpha", "rpo")):
            require(self.loss_type == kind or getattr(self, key) is None,
                    f"{{{key}}} applies to the {kind!r} loss only, not to {{loss_type}} {self.loss_type!r}", self.label)
        require(self.simpo_gamma is None or self.simpo_gamma >= 0,
                "{simpo_gamma} must be non-negative (a target margin)", self.label, got=self.simpo_gamma)
        require(self.rpo_alpha is None or self.rpo_alpha > 0, "{rpo_alpha} must be positive (0 is loss_type sigmoid)",
                self.label, got=self.rpo_alpha)
        require(self.tree_max_length > 0 and self.tree_max_pairs > 0,
                "{tree_max_length} and {tree_max_pairs} must be positive", self.label)
        require(self.rounds >= 1, "{rounds} must be at least 1", self.label, got=self.rounds)
        require(self.round_reference in ("previous", "sft"), "{round_reference} must be 'previous' or 'sft'",
                self.label, got=self.round_reference)

    def objective_settings(self) -> dict[str, Any]:
        """The settings of the objective `loss_type`, as `pdpo_jax.preference_loss(loss_type, ...)`
        takes them (only those it has; an unset optional one takes the objective's default)."""
        settings: dict[str, Any] = {"beta": self.beta}
        if self.loss_type in DPO_FAMILY:
            settings |= {"label_smoothing": self.label_smoothing, "reference_free": self.reference_free}
        for key, kind in (("simpo_gamma", "simpo"), ("rpo_alpha", "rpo")):
            if self.loss_type == kind and getattr(self, key) is not None:
                settings[key] = getattr(self, key)
        return settings


@dataclass
class NliSection(TrainingSection):
    """`pdpo train-nli`: the three-way NLI classifier behind the RL(DialogueNLI) reward."""

    label: ClassVar[str] = "nli"

    pairs: list[str] = field(default_factory=list)  # NLI pair files: `s1</s>s2</s>label` lines or the official jsonl
    val_pairs: list[str] = field(default_factory=list)  # held-out pair files; none: val_fraction of `pairs`
    val_fraction: float = 0.1
    model: str = "default"  # the classifier's trunk: any model `load_model` opens
    max_length: int = 128  # tokens of a pair; longer pairs keep their end
    optimizer: OptimizerConfig = NLI_DEFAULTS
    batch_size: int = 16
    epochs: int = 2

    def __post_init__(self) -> None:
        super().__post_init__()
        require(0.0 < self.val_fraction < 1.0, "{val_fraction} must lie in (0, 1)", self.label, got=self.val_fraction)
        require(self.max_length > 2, "{max_length} is too small", self.label, got=self.max_length)


@dataclass
class RLSection(TrainingSection):
    """`pdpo rl`: PPO against the NLI reward with a KL penalty to the starting model (TRL's classic
    PPOTrainer defaults). `batch_size` counts the prompts of one rollout (one loop step)."""

    label: ClassVar[str] = "rl"

    policy: str | None = None  # start and frozen reference; None = <run_dir>/sft/best
    classifier: str | None = None  # the NLI classifier; None = <run_dir>/nli/classifier
    reward: Literal["song", "entail_minus_contradict", "entailment"] = "song"
    optimizer: OptimizerConfig = RL_DEFAULTS
    batch_size: int = 16  # prompts per rollout (one loop step)
    mini_batch_size: int = 4  # rows per micro-batch of a PPO update
    # grad_accum: micro-batches per update, so an update sees mini_batch_size * grad_accum rows
    ppo_epochs: int = 4  # passes over each rollout
    epochs: int = 2  # passes over the training prompts (the paper: at most 2); max_steps counts rollouts
    eval_every: int = 20
    checkpoint_every: int = 20
    max_new_tokens: int = 32
    # Pure sampling at temperature 1: PPO's ratios are taken against the distribution that sampled.
    sampler: SamplerSection = field(default_factory=lambda: SamplerSection(kind="temperature"))
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    kl_coef: float = 0.2  # the starting coefficient of the KL penalty
    adaptive_kl: bool = True  # Ziegler et al.'s controller towards kl_target; False: kl_coef fixed
    kl_target: float = 6.0
    kl_horizon: float = 10000.0
    max_val_examples: int | None = None  # validation prompts (greedy responses) per validation; None = all

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_positive(self, "mini_batch_size", "ppo_epochs", "max_new_tokens")
        require(self.batch_size % (self.mini_batch_size * self.grad_accum) == 0,
                "{batch_size} must be a multiple of {mini_batch_size} * {grad_accum} (the rows of one PPO update)",
                self.label)
        require(0.0 <= self.gamma <= 1.0 and 0.0 <= self.lam <= 1.0, "{gamma} and {lam} must lie in [0, 1]",
                self.label)
        require(self.cliprange > 0 and self.cliprange_value > 0, "{cliprange} and {cliprange_value} must be positive",
                self.label)
        require(self.kl_coef >= 0 and self.kl_target > 0 and self.kl_horizon > 0,
                "{kl_coef} must be non-negative, {kl_target} and {kl_horizon} positive", self.label)


@dataclass
class PipelineSection:
    stages: list[str] | None = None  # what `pdpo pipeline` runs (in pipeline order); None = its default list


@dataclass
class EvalSection:
    dnli: list[str] = field(default_factory=list)
    protocol: Literal["31", "all"] = "31"
    length_normalized: bool = False
    max_examples: int | None = None


@dataclass
class TestResponsesSection:
    """The responses every trained model gives to the test dialogues' turns: what the judge and the
    annotators compare."""

    label: ClassVar[str] = "test_responses"
    sampler: SamplerSection = field(default_factory=lambda: SamplerSection(kind="greedy"))
    max_new_tokens: int = 48
    batch_size: int = 16  # conversations sampled together
    seed: int = 0  # batch b samples with seed + b; also picks the turns when max_examples is set
    max_examples: int | None = None  # a seeded sample of N turns; None = every turn answering a partner line

    def __post_init__(self) -> None:
        _require_positive(self, "max_new_tokens", "batch_size")
        require(self.max_examples is None or self.max_examples > 0, "{max_examples} must be positive or null",
                self.label, got=self.max_examples)


@dataclass
class JudgeSection:
    """`pdpo judge`: the judge endpoint and how pairs are judged. There is no key for the API key:
    it is read from the environment variable that `api_key_env` names, so no config file holds it."""

    model: str | None = None  # the judge model's name at the endpoint
    base_url: str | None = None  # an OpenAI-compatible endpoint; None = the OpenAI API
    serve: str | None = None  # a model directory or "default": the judge stage serves it itself, over the run's mesh
    api_key_env: str = "OPENAI_API_KEY"
    language: str = "en"  # judge prompt language: en or ja
    orders: Literal["both", "single"] = "both"
    temperature: float = 0.0
    max_tokens: int = 1024
    timeout: float = 60.0  # seconds per request
    concurrency: int = 8  # requests in flight at most
    max_retries: int = 6
    backoff_base: float = 1.0  # seconds, doubling per retry
    backoff_max: float = 60.0
    cache: str | None = None  # None = judge_cache.jsonl in the output folder
    games: int | None = None  # tournament; None = 1000, or every combination if fewer
    limit: int | None = None  # pairwise: only the first N shared ids
    bootstrap: int = 1000
    seed: int = 0
    mode: Literal["pairwise", "tournament"] = "pairwise"
    plots: bool = True


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    run_suffix: str = ""  # appended to run_dir once all files are merged (variant files set it)
    seed: int = 0
    model: ModelSection = field(default_factory=ModelSection)
    mesh: MeshSection = field(default_factory=MeshSection)
    data: DataSection = field(default_factory=DataSection)
    sft: SFTSection = field(default_factory=SFTSection)
    prefs: PrefsSection = field(default_factory=PrefsSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    nli: NliSection = field(default_factory=NliSection)
    rl: RLSection = field(default_factory=RLSection)
    pipeline: PipelineSection = field(default_factory=PipelineSection)
    eval: EvalSection = field(default_factory=EvalSection)
    test_responses: TestResponsesSection = field(default_factory=TestResponsesSection)
    judge: JudgeSection = field(default_factory=JudgeSection)


def load_config(paths: str | Path | list[str | Path] | None, overrides: list[str] = ()) -> RunConfig:
    """Reads YAML configs (each following its `base:` links; later files win), applies
    `a.b=value` overrides, validates."""
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    raw: dict[str, Any] = {}
    suffix = ""
    for path in paths:
        layer = _read_yaml_with_bases(Path(path))
        suffix += _run_suffix(layer, where=str(path))
        _deep_merge(raw, layer)
    for override in overrides:
        key, sep, value = override.partition("=")
        where = f"override {shown(override)}"
        if not sep or not key:
            raise ConfigError(f"{where}: expected key=value, e.g. sft.epochs=2")
        _set_dotted(raw, key.strip(), _parse_yaml(value, where), where=where)
    where = " + ".join(str(p) for p in paths) or "defaults"
    suffix += _run_suffix(raw, where=where)
    config = _build(RunConfig(), raw, where=where, prefix="")
    if suffix:
        config = dataclasses.replace(config, run_dir=config.run_dir + suffix)
    return config


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: RunConfig) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _run_suffix(layer: dict[Any, Any], where: str) -> str:
    suffix = layer.pop("run_suffix", "")
    if suffix is None or suffix == "":
        return ""
    if isinstance(suffix, (dict, list)):
        raise ConfigError(f"{where}: run_suffix must be a string, got {shown(suffix)}")
    return str(suffix)


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: `base:` links form a cycle")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a YAML file (not UTF-8 text at byte {err.start})") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot be read ({err.strerror or type(err).__name__})") from None
    data = _parse_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base must be the path of one YAML file, got {shown(base)}")
    merged = _read_yaml_with_bases((path.parent / base), seen + (path,))
    _deep_merge(merged, data)
    return merged


def _parse_yaml(text: str, where: str) -> Any:
    """The YAML value of `text`, refused (ConfigError naming `where`) when it is not YAML or is too
    large or too deep once its aliases are expanded."""
    if _bracket_depth(text) > MAX_CONFIG_DEPTH:  # PyYAML takes seconds to fail on thousands of `[`
        raise ConfigError(f"{where}: brackets nested deeper than {MAX_CONFIG_DEPTH} levels")
    try:
        value = yaml.safe_load(text)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = err.problem or err.context or "cannot be parsed"
        raise ConfigError(f"{where}: not valid YAML{at}: {problem[:120]}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{where}: not valid YAML: {str(err)[:120]}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to read (at most {MAX_CONFIG_DEPTH} levels)") from None
    _check_extent(value, where)
    return value


def _bracket_depth(text: str) -> int:
    """How deep `[` and `{` nest in `text`, counting those inside quotes too (an upper bound)."""
    depth = deepest = 0
    for match in _BRACKET.finditer(text):
        depth = depth + 1 if match.group() in "[{" else max(0, depth - 1)
        deepest = max(deepest, depth)
    return deepest


_BRACKET = re.compile(r"[\[\]{}]")


def _check_extent(value: Any, where: str) -> None:
    """Refuses a value that holds itself, nests deeper than MAX_CONFIG_DEPTH or counts more than
    MAX_CONFIG_VALUES values with its aliases expanded. Each distinct list or mapping is visited
    once (its expanded count is remembered), so the check costs the size of the file, not of its
    expansion."""
    counted: dict[int, int] = {}
    open_containers: set[int] = set()

    def count(node: Any, depth: int) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) in counted:
            return counted[id(node)]
        if id(node) in open_containers:
            raise ConfigError(f"{where}: a YAML alias refers to a value that contains it")
        if depth >= MAX_CONFIG_DEPTH:
            raise ConfigError(f"{where}: nested deeper than {MAX_CONFIG_DEPTH} levels")
        open_containers.add(id(node))
        children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
        total = 1
        for child in children:
            total += count(child, depth + 1)
            if total > MAX_CONFIG_VALUES:
                raise ConfigError(f"{where}: more than {MAX_CONFIG_VALUES:,} values once its YAML aliases are "
                                  f"expanded; a config holds a few hundred")
        open_containers.discard(id(node))
        counted[id(node)] = total
        return total

    count(value, 0)


def _deep_merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_merge(into[key], value)
        else:
            into[key] = value


def _set_dotted(raw: dict[str, Any], key: str, value: Any, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def _build(default: Any, raw: Any, where: str, prefix: str) -> Any:
    """A copy of the dataclass instance `default` with the keys of `raw` replaced (recursively)."""
    cls = type(default)
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'top level'} must be a mapping, got {shown(raw)}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((key for key in raw if key not in names), key=str)
    if unknown:
        raise ConfigError(
            f"{where}: unknown key '{prefix}{str(unknown[0])[:60]}'; known keys here: "
            f"{', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        current = getattr(default, name)
        if dataclasses.is_dataclass(current):
            kwargs[name] = _build(current, value, where, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(hints[name], value, where, f"{prefix}{name}")
    try:
        return dataclasses.replace(default, **kwargs)
    except InvalidSetting as err:  # the section's own check, written under its dotted path
        raise ConfigError(f"{where}: {err.at(prefix)}") from None


def _coerce(hint: Any, value: Any, where: str, key: str) -> Any:
    if dataclasses.is_dataclass(hint):
        if isinstance(value, str) and getattr(hint, "shorthand", None):
            value = {hint.shorthand: value}
        return _build(hint(), value, where, key + ".")
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key} must be one of {list(args)}, got {shown(value)}")
        return value
    if origin is list:
        if isinstance(value, (str, int, float)):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list, got {shown(value)}")
        return [_coerce(args[0], v, where, f"{key}[{i}]" if dataclasses.is_dataclass(args[0]) else key)
                for i, v in enumerate(value)]
    if hint is float:
        try:  # YAML 1.1 reads `1e-6` (no dot) as a string
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{where}: {key} must be a number, got {shown(value)}") from None
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where}: {key} must be {hint.__name__}, got {shown(value)}")
    return value
