import dataclasses
from pathlib import Path

import pytest

from pdpo_jax.config import ConfigError, dump_config, load_config


def test_defaults_are_the_papers_appendix_b_values():
    config = load_config(None)
    assert config.sft.optimizer.learning_rate == 1e-5 and config.sft.optimizer.schedule == "cosine"
    assert config.sft.batch_size * config.sft.grad_accum == 16 and config.sft.epochs == 5
    assert config.dpo.optimizer.learning_rate == 1e-6 and config.dpo.optimizer.schedule == "linear"
    assert config.dpo.beta == 0.5 and config.dpo.batch_size == 4 and config.dpo.epochs == 3
    for opt in (config.sft.optimizer, config.dpo.optimizer):
        assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.max_grad_norm) == (0.9, 0.999, 1e-8, 0.1, 1.0)
        assert opt.warmup_ratio == 0.05


def test_overrides_are_typed_and_keep_section_defaults():
    config = load_config(None, ["dpo.optimizer.learning_rate=2e-6", "sft.epochs=2", "data.train=a.txt"])
    assert config.dpo.optimizer.learning_rate == 2e-6
    assert config.dpo.optimizer.schedule == "linear"  # the DPO section's own default survives
    assert config.sft.epochs == 2 and config.data.train == ["a.txt"]


def test_base_file_is_merged_and_round_trips(tmp_path):
    (tmp_path / "base.yaml").write_text("run_dir: runs/x\nprefs:\n  shuffle: true\n  max_new_tokens: 32\n")
    (tmp_path / "variant.yaml").write_text("base: base.yaml\nprefs:\n  shuffle: false\n")
    config = load_config(tmp_path / "variant.yaml")
    assert config.prefs.shuffle is False and config.prefs.max_new_tokens == 32 and config.run_dir == "runs/x"
    (tmp_path / "dumped.yaml").write_text(dump_config(config))
    assert load_config(tmp_path / "dumped.yaml") == config


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("sft.epoch=2", "unknown key 'sft.epoch'"),
        ("dpo.loss_type=foo", "dpo.loss_type must be one of"),
        ("sft.optimizer.learning_rate=abc", "sft.optimizer.learning_rate must be a number"),
        ("sft.epochs=two", "sft.epochs must be int"),
        ("dpo.beta=0", "dpo.beta must be positive"),
        ("nonsense", "expected key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_bad_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  batch_sise: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'sft.batch_sise'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(p.name for p in (CONFIGS / "paper").glob("[!_]*.yaml")))
def test_every_paper_config_loads_with_appendix_b_values(path):
    config = load_config(CONFIGS / "paper" / path)
    assert "/" in config.model.path  # a Hugging Face repository name
    assert config.sft.optimizer.learning_rate == 1e-5 and config.dpo.optimizer.learning_rate == 1e-6
    assert config.dpo.beta == 0.5 and config.model.dtype == "bfloat16"
    assert config.run_dir == f"runs/paper/{path[:-5]}"
    for batch in (config.sft.batch_size, config.dpo.batch_size):
        assert batch % (config.mesh.data * config.mesh.fsdp) == 0  # rows split over the data-parallel axes


def test_variant_files_stack_on_a_model_file():
    model = CONFIGS / "paper" / "gpt2-medium.yaml"
    ablation = load_config([model, CONFIGS / "paper" / "variants" / "wo-shuffle.yaml"])
    assert ablation.prefs.shuffle is False and ablation.run_dir == "runs/paper/gpt2-medium-wo-shuffle"
    cross = load_config([model, CONFIGS / "paper" / "variants" / "from-llama-2-13b.yaml"])
    assert cross.prefs.generator == "runs/paper/llama-2-13b/sft/best"
    assert cross.model.path == "openai-community/gpt2-medium" and cross.prefs.shuffle is True


@pytest.mark.parametrize("path", sorted(p.name for p in (CONFIGS / "experiments").glob("*.yaml")))
def test_every_experiment_config_loads_once_its_data_folder_is_filled_in(tmp_path, path):
    # As scripts/run_reproduction.py does: PDPO_DATA replaced, the files side by side for `base:`.
    for source in (CONFIGS / "experiments").glob("*.yaml"):
        (tmp_path / source.name).write_text(source.read_text().replace("PDPO_DATA", "/data"))
    config = load_config(tmp_path / path)
    assert "PDPO_DATA" not in dump_config(config)


def test_the_cpu_rl_config_stacks_on_the_cpu_run_with_trls_ppo_settings(tmp_path):
    for source in (CONFIGS / "experiments").glob("personachat-cpu*.yaml"):
        (tmp_path / source.name).write_text(source.read_text().replace("PDPO_DATA", "/data"))
    cpu = load_config(tmp_path / "personachat-cpu.yaml")
    stacked = load_config([tmp_path / "personachat-cpu.yaml", tmp_path / "personachat-cpu-rl.yaml"])
    assert stacked.data == cpu.data and stacked.sft == cpu.sft and stacked.eval == cpu.eval  # the same SFT model and DNLI
    assert stacked.nli.pairs == ["/data/dnli/pairs/nli-train.txt"] and stacked.nli.val_pairs == []
    defaults = load_config(None).rl
    for key in ("gamma", "lam", "cliprange", "cliprange_value", "vf_coef", "kl_coef", "adaptive_kl", "ppo_epochs", "optimizer"):
        assert getattr(stacked.rl, key) == getattr(defaults, key), key
    assert stacked.rl.max_steps and stacked.rl.max_new_tokens == cpu.prefs.max_new_tokens  # negatives and rollouts alike


def test_rl_defaults_are_trls_ppo_defaults():
    rl = load_config(None).rl
    assert (rl.gamma, rl.lam, rl.cliprange, rl.cliprange_value, rl.vf_coef) == (1.0, 0.95, 0.2, 0.2, 0.1)
    assert (rl.kl_coef, rl.adaptive_kl, rl.kl_target, rl.kl_horizon, rl.ppo_epochs) == (0.2, True, 6.0, 10000.0, 4)
    assert rl.optimizer.learning_rate == 1.41e-5 and rl.optimizer.schedule == "constant"
    assert rl.optimizer.weight_decay == 0.0 and rl.optimizer.max_grad_norm is None
    assert rl.epochs == 2 and rl.sampler.kind == "temperature" and rl.sampler.temperature == 1.0


@pytest.mark.parametrize("path", sorted(p.name for p in (CONFIGS / "paper").glob("[!_]*.yaml")))
def test_the_rl_variants_stack_on_every_paper_model_file(path):
    from pdpo_jax.stages.pipeline import stages_to_run

    model = CONFIGS / "paper" / path
    baseline = load_config([model, CONFIGS / "paper" / "variants" / "rl-dnli.yaml"])
    assert baseline.run_dir == f"runs/paper/{path[:-5]}"  # shares the model's SFT and summary
    assert stages_to_run(baseline) == ("sft", "train-nli", "rl", "eval-sft", "eval-rl", "summary")
    for batch in (baseline.rl.batch_size, baseline.rl.mini_batch_size, baseline.nli.batch_size):
        assert batch % (baseline.mesh.data * baseline.mesh.fsdp) == 0
    then_dpo = load_config([model, CONFIGS / "paper" / "variants" / "rl-dnli-pseudo-dpo.yaml"])
    assert then_dpo.prefs.from_stage == "rl" and then_dpo.run_dir == f"runs/paper/{path[:-5]}-rl-pseudo-dpo"
    assert stages_to_run(then_dpo).index("rl") < stages_to_run(then_dpo).index("make-prefs")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("rl.batch_size=6", "multiple of rl.mini_batch_size"),
        ("rl.reward=cosine", "rl.reward must be one of"),
        ("prefs.from_stage=dpo", "prefs.from_stage must be one of"),
        ("nli.val_fraction=1.5", "nli.val_fraction"),
        ("rl.kl_target=0", "rl.kl_target"),
    ],
)
def test_bad_rl_and_nli_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config(None, [override])


def test_an_unknown_pipeline_stage_in_the_config_names_the_key():
    from pdpo_jax.stages.pipeline import stages_to_run

    with pytest.raises(ConfigError, match=r"pipeline.stages: unknown stage\(s\) \['rll'\]"):
        stages_to_run(load_config(None, ["pipeline.stages=[sft,rll]"]))


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("prefs.sampler.top_p=0", r"prefs\.sampler\.top_p must be in \(0, 1\], got 0"),
        ("test_responses.sampler.temperature=0", r"test_responses\.sampler\.temperature must be positive"),
        ("rl.sampler.top_k=0", r"rl\.sampler\.top_k must be at least 1"),
        ("prefs.shard_size=0", r"prefs\.shard_size must be positive"),
        ("nli.grad_accum=0", r"nli\.grad_accum must be positive"),
        ("dpo.eval_every=0", r"dpo\.eval_every must be positive"),
        ("sft.max_steps=0", r"sft\.max_steps must be positive or null"),
        ("dpo.optimizer.warmup_ratio=1", r"dpo\.optimizer\.warmup_ratio must lie in \[0, 1\)"),
        ("dpo.label_smoothing=0.2", None),  # fine with the sigmoid loss ...
        ("dpo.loss_type=ipo", None),
    ],
)
def test_each_section_checks_its_own_keys_under_their_dotted_path(override, fragment):
    if fragment is None:
        load_config(None, [override])
        return
    with pytest.raises(ConfigError, match=rf"^defaults: {fragment}"):
        load_config(None, [override])


def test_label_smoothing_needs_the_sigmoid_loss():
    with pytest.raises(ConfigError, match=r"dpo\.label_smoothing applies to the 'sigmoid' loss only, not to "
                                          r"dpo\.loss_type 'hinge'"):
        load_config(None, ["dpo.loss_type=hinge", "dpo.label_smoothing=0.1"])


def test_a_section_built_in_code_checks_itself_too():
    from pdpo_jax.config import DPOSection, RLSection, SamplerSection

    with pytest.raises(ValueError, match=r"^dpo\.beta must be positive, got 0"):
        DPOSection(beta=0)
    with pytest.raises(ValueError, match=r"^rl\.batch_size must be a multiple of rl\.mini_batch_size \* rl\.grad_accum"):
        RLSection(batch_size=6)
    with pytest.raises(ValueError, match=r"^sampler\.top_p must be in \(0, 1\]"):
        SamplerSection(top_p=1.5)


def test_the_training_sections_share_one_base_with_their_own_defaults():
    from pdpo_jax.config import TrainingSection

    config = load_config(None)
    shared = {field.name for field in dataclasses.fields(TrainingSection)}
    assert shared >= {"optimizer", "batch_size", "grad_accum", "epochs", "max_steps", "eval_every", "checkpoint_every"}
    for section in (config.sft, config.dpo, config.nli, config.rl):
        assert isinstance(section, TrainingSection)
    assert (config.sft.grad_accum, config.dpo.epochs, config.nli.batch_size, config.rl.eval_every) == (4, 3, 16, 20)
