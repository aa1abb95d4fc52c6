"""The config loader over random YAML: trees of known and unknown keys with values of every type,
aliases, deep nesting, random text and overrides. Every input is a RunConfig or a ConfigError whose
message is one line of bounded length, in bounded time (docs/bad-input.md, "Configs")."""

from __future__ import annotations

import dataclasses
import math
import tempfile
import time
from pathlib import Path

import yaml
from bad_input_fixtures import nested_aliases
from fuzz_fixtures import examples
from hypothesis import given, settings
from hypothesis import strategies as st

from pdpo_jax.cli import _message
from pdpo_jax.config import ConfigError, RunConfig, dump_config, load_config

SECONDS = 10.0  # a config loads in milliseconds; the bound is loose for a loaded shared machine
# A message may list the keys a section knows (rl has ~30), so its bound is looser than the 300
# characters of the alias-bomb test; what matters is that it does not grow with the input.
MAX_FUZZ_MESSAGE_CHARS = 1000


def _keys(cls: type) -> list[str]:
    names = []
    for field in dataclasses.fields(cls):
        names.append(field.name)
        default = getattr(cls(), field.name)
        if dataclasses.is_dataclass(default):
            names += _keys(type(default))
    return names


KNOWN_KEYS = sorted(set(_keys(RunConfig)))
keys = st.one_of(st.sampled_from(KNOWN_KEYS), st.text(max_size=12), st.integers(), st.booleans(), st.none())
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(-2**80, 2**80) | st.just(10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=40),
                    st.sampled_from(["cosine", "sigmoid", "both", "1e-6", "default", "top_p", "tree", "auto"]))
trees = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(keys, inner, max_size=5),
                     max_leaves=40)
configs = st.dictionaries(st.one_of(st.sampled_from(KNOWN_KEYS), keys), trees, max_size=6)


def assert_answered(load) -> None:
    start = time.perf_counter()
    try:
        config = load()
    except ConfigError as err:
        message = _message(err)
        assert "\n" not in message and len(message) < MAX_FUZZ_MESSAGE_CHARS, message[:1200]
        assert not message.startswith("internal error"), message
    else:
        assert isinstance(config, RunConfig)
        dump_config(config)  # what a stage writes as the run's resolved config.yaml
    assert time.perf_counter() - start < SECONDS


def load_text(text: str, base: str | None = None) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "config.yaml"
        path.write_text(text, encoding="utf-8")
        if base is not None:
            (Path(folder) / "base.yaml").write_text(base, encoding="utf-8")
        assert_answered(lambda: load_config(path))


@settings(max_examples=examples())
@given(tree=configs)
def test_random_trees_load_or_get_one_line(tree):
    text = yaml.safe_dump(tree, allow_unicode=True)
    load_text(text)


@settings(max_examples=examples())
@given(section=st.sampled_from(["judge", "data", "sft", "dpo", "run_suffix", "base"]),
       field=st.sampled_from(["model", "train", "epochs", "beta", "optimizer", "sampler"]),
       levels=st.integers(1, 12), width=st.integers(1, 12))
def test_alias_trees_of_any_size_load_or_get_one_line(section, field, levels, width):
    value = nested_aliases(levels, width)
    load_text(f"{section}: {value}\n" if section in ("run_suffix", "base") else f"{section}: {{{field}: {value}}}\n")


@settings(max_examples=examples())
@given(depth=st.integers(1, 30_000), style=st.sampled_from(["[", "{a: ", "- "]))
def test_nesting_of_any_depth_loads_or_gets_one_line(depth, style):
    if style == "- ":  # block sequences in one another, no bracket at all
        load_text(f"data:\n  train:\n    {style * depth}x.txt\n")
    else:
        closer = "]" if style == "[" else "}"
        load_text(f"data: {{train: {style * depth}{closer * depth}}}\n")


@settings(max_examples=examples())
@given(text=st.text(max_size=300), base=st.one_of(st.none(), st.text(max_size=200)))
def test_random_text_loads_or_gets_one_line(text, base):
    load_text(text if base is None else f"base: base.yaml\n{text}", base=base)


@settings(max_examples=examples())
@given(overrides=st.lists(st.one_of(
    st.tuples(st.sampled_from(KNOWN_KEYS + ["sft.epochs", "dpo.beta", "judge.model", "data.train", "x.y.z"]),
              st.text(max_size=40)).map("=".join),
    st.text(max_size=40)), max_size=4))
def test_random_overrides_load_or_get_one_line(overrides):
    assert_answered(lambda: load_config(None, overrides))


def test_floats_that_are_no_numbers_are_refused_where_a_positive_number_is_needed():
    for value in (".nan", "-.inf"):
        try:
            config = load_config(None, [f"dpo.beta={value}"])
        except ConfigError as err:
            assert "dpo.beta" in str(err)
        else:
            raise AssertionError(f"dpo.beta={value} accepted as {config.dpo.beta}")
    assert math.isinf(load_config(None, ["dpo.beta=.inf"]).dpo.beta)
