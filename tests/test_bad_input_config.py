"""Config files and overrides that used to hang the loader or end in an internal error: each gets one
line `pdpo <stage>: ...` naming the file, exit status 2, in bounded time (docs/bad-input.md)."""

from __future__ import annotations

import time

import pytest
from bad_input_fixtures import MAX_MESSAGE_CHARS, assert_refused, nested_aliases, run_cli

from pdpo_jax.config import MAX_CONFIG_DEPTH, ConfigError, load_config

BOMB_SECONDS = 2.0


def test_a_9x9_yaml_alias_bomb_is_refused_in_under_2_s_with_a_short_line(tmp_path, capsys):
    config = tmp_path / "bomb.yaml"
    config.write_text(f"judge: {{model: {nested_aliases(9)}}}\n")
    assert config.stat().st_size < 700
    status, error, seconds = run_cli(["judge", "--config", str(config)], capsys)
    assert_refused(status, error, "judge", str(config), "aliases")
    assert seconds < BOMB_SECONDS, seconds


@pytest.mark.parametrize("where", ["judge: {model: %s}", "run_suffix: %s", "data: {train: [%s]}"])
def test_aliases_that_expand_to_half_a_million_values_are_refused_in_short(where, tmp_path):
    """Six levels fit in memory: before, the message quoted all 531,441 strings (4.3 MB)."""
    config = tmp_path / "six.yaml"
    config.write_text(where % nested_aliases(6) + "\n")
    with pytest.raises(ConfigError, match="aliases are expanded") as err:
        load_config(config)
    assert len(str(err.value)) < MAX_CONFIG_DEPTH * 4


def test_a_value_below_the_alias_budget_is_shown_cut_short(tmp_path):
    config = tmp_path / "five.yaml"
    config.write_text(f"judge: {{model: {nested_aliases(5)}}}\n")  # 59,049 strings: allowed, but not a str
    with pytest.raises(ConfigError, match=r"judge\.model must be str, got \[\[") as err:
        load_config(config)
    assert len(str(err.value)) < MAX_MESSAGE_CHARS


def test_an_alias_that_holds_itself_is_refused(tmp_path):
    config = tmp_path / "loop.yaml"
    config.write_text("data: {train: &loop [a.txt, *loop]}\n")
    with pytest.raises(ConfigError, match="refers to a value that contains it"):
        load_config(config)


@pytest.mark.parametrize("depth", [MAX_CONFIG_DEPTH + 1, 20_000])
def test_a_deeply_nested_list_is_refused(depth, tmp_path, capsys):
    config = tmp_path / "deep.yaml"
    config.write_text("data: {train: " + "[" * depth + "]" * depth + "}\n")
    status, error, _ = run_cli(["sft", "--config", str(config)], capsys)
    assert_refused(status, error, "sft", str(config), "nested")


@pytest.mark.parametrize("base", ["5", "[a.yaml, b.yaml]", "{a: 1}", "''"])
def test_a_base_that_is_not_one_path_is_refused(base, tmp_path, capsys):
    config = tmp_path / "variant.yaml"
    config.write_text(f"base: {base}\nsft: {{epochs: 2}}\n")
    status, error, _ = run_cli(["sft", "--config", str(config)], capsys)
    assert_refused(status, error, "sft", str(config), "base must be the path of one YAML file")


def test_a_binary_base_file_is_named(tmp_path, capsys):
    (tmp_path / "base.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe")
    config = tmp_path / "variant.yaml"
    config.write_text("base: base.yaml\n")
    status, error, _ = run_cli(["sft", "--config", str(config)], capsys)
    assert_refused(status, error, "sft", str(tmp_path / "base.yaml"), "not UTF-8")


@pytest.mark.parametrize("text, fragment", [
    ("1: 2\n", "unknown key '1'"),  # keys of mixed types used to break the sort of unknown keys
    ("sft: {epochs: 2}\n3: x\nzz: 1\n", "unknown key '3'"),
    ("sft: {optimizer: {learning_rate: %d}}\n" % 10**400, "learning_rate must be a number"),
    ("run_suffix: [a, b]\n", "run_suffix must be a string"),
    ("sft: !!python/object:os.system {}\n", "not valid YAML at line 1"),
    ("sft: [\n", "not valid YAML"),
])
def test_odd_values_get_one_line(text, fragment, tmp_path, capsys):
    config = tmp_path / "odd.yaml"
    config.write_text(text)
    status, error, _ = run_cli(["sft", "--config", str(config)], capsys)
    assert_refused(status, error, "sft", fragment)


def test_an_override_bomb_is_refused_too():
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="override 'judge.model=&a9 .*aliases are expanded") as err:
        load_config(None, [f"judge.model={nested_aliases(9)}"])
    assert time.perf_counter() - start < BOMB_SECONDS
    assert len(str(err.value)) < MAX_MESSAGE_CHARS
