"""Sampling nested prompts from one prefill per group (`generate_tree`) against `generate` on every
prompt's own row: the same greedy tokens, the same draws, the same logits at every step."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from model_fixtures import RecordingSampler, early_stopping_eos, make_tiny_hf_model
from pdpo_jax.generation import Greedy, TopP, generate, right_padded
from pdpo_jax.generation.tree_decode import _tree_decode, generate_tree, nested_groups, next_power_of_two, tree_layout
from pdpo_jax.model import load_model
from pdpo_jax.parallel import make_mesh

NEW_TOKENS = 24
PAD = 0
ROWS = 12
# fp32: the trunk's attention sums over a wider, differently padded row than each prompt's own
LOGITS_TOL = 1e-4


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree_decode")
    # a wide initialisation, so greedy decoding of a random model does not repeat one token
    return {family: make_tiny_hf_model(root, family, initializer_range=0.3) for family in ("llama", "gpt2")}


def with_tokens(model, *, eos: int):
    return dataclasses.replace(model, config=model.config.replace(eos_token_id=eos, pad_token_id=PAD), tokenizer=None)


def dialogue_prompts(seed: int = 0) -> list[list[int]]:
    """Prompts like a sampling batch's: three dialogues of nesting turns (a persona, then a turn of
    a few tokens each), the second cut short of history before its last turn (it starts again)."""
    rng = np.random.default_rng(seed)
    words = lambda n: [int(t) for t in rng.integers(3, 120, size=n)]  # noqa: E731
    prompts = []
    for turns, cut_at in ((4, None), (3, 2), (3, None)):
        prompt = words(5)
        for turn in range(turns):
            if turn == cut_at:  # oldest history dropped: this prompt no longer extends the last one
                prompt = prompt[:2] + prompt[-3:]
            prompts.append(list(prompt))
            prompt = prompt + words(int(rng.integers(1, 4)))
    return prompts


def per_turn(model, prompts, **kwargs):
    ids, mask = right_padded(prompts, ROWS, PAD)
    return generate(model, ids, mask, max_new_tokens=NEW_TOKENS, **kwargs)[: len(prompts)]


def test_nested_groups_follow_token_prefixes():
    prompts = dialogue_prompts()
    assert nested_groups(prompts) == [[0, 1, 2, 3], [4, 5], [6], [7, 8, 9]]
    assert nested_groups([[1, 2], [1, 2], [1, 2, 3], [2], [1, 2, 3, 4]]) == [[0, 1, 2], [3], [4]]
    assert [next_power_of_two(n, 16) for n in (1, 2, 3, 5, 9, 17)] == [1, 2, 4, 8, 16, 16]
    layout = tree_layout(prompts, ROWS, PAD)
    assert layout.trunk_ids.shape[0] == 4  # 4 groups; 12 decode rows
    assert layout.branch_trunk.tolist() == [0, 0, 0, 0, 1, 1, 2, 3, 3, 3, 3, 3]  # filler repeats the last prompt
    assert layout.branch_length.tolist() == [len(p) for p in prompts] + [len(prompts[-1])] * 2
    trunks = (prompts[3], prompts[5], prompts[6], prompts[9])
    for trunk, valid, prompt in zip(layout.trunk_ids, layout.trunk_valid, trunks):
        assert trunk[: valid.sum()].tolist() == prompt and valid[: len(prompt)].all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_greedy_tokens_equal_per_turn_generation_with_early_stop(tiny_dirs, family):
    prompts = dialogue_prompts()
    model = with_tokens(load_model(tiny_dirs[family]), eos=10_000)
    eos = early_stopping_eos(per_turn(model, prompts), PAD, earliest=3, latest=NEW_TOKENS - 6)
    model = with_tokens(model, eos=eos)
    expected = per_turn(model, prompts)
    ours = generate_tree(model, prompts, max_new_tokens=NEW_TOKENS, rows=ROWS)
    np.testing.assert_array_equal(ours, expected)
    stopped = [(row == eos).any() for row in expected]
    assert any(stopped) and not all(stopped)
    assert len(np.unique(ours)) > 10


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_step_sees_the_logits_of_its_own_prompt(tiny_dirs, family):
    """Top-p draws: the same tokens as per-turn sampling with the same seed (the uniform numbers
    depend on seed, step and row only), each chosen from the same logits, the first step's included."""
    model = with_tokens(load_model(tiny_dirs[family]), eos=10_000)  # never sampled: every row runs to the end
    prompts = dialogue_prompts(seed=1)
    theirs, ours = RecordingSampler(TopP(0.9)), RecordingSampler(TopP(0.9))
    expected = per_turn(model, prompts, sampler=theirs, seed=5)
    tokens = generate_tree(model, prompts, max_new_tokens=NEW_TOKENS, sampler=ours, seed=5, rows=ROWS)
    np.testing.assert_array_equal(tokens, expected)
    their_logits, our_logits = (np.stack(r.seen, axis=1)[: len(prompts)] for r in (theirs, ours))
    assert our_logits.shape == (len(prompts), NEW_TOKENS, model.config.vocab_size)
    np.testing.assert_allclose(our_logits[:, 0], their_logits[:, 0], atol=LOGITS_TOL, rtol=0)
    np.testing.assert_allclose(our_logits, their_logits, atol=LOGITS_TOL, rtol=0)


def test_scanned_layers_fork_the_stacked_cache(tiny_dirs):
    prompts = dialogue_prompts(seed=2)
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    scanned = with_tokens(load_model(tiny_dirs["llama"], scan_layers=True), eos=10_000)
    np.testing.assert_array_equal(generate_tree(scanned, prompts, max_new_tokens=NEW_TOKENS, rows=ROWS),
                                  per_turn(model, prompts))


@pytest.mark.parametrize("axes", [dict(data=4, fsdp=2), dict(data=2, fsdp=2, tensor=2)], ids=["batch", "tensor"])
def test_sharded_tree_generation_equals_one_device(tiny_dirs, axes):
    mesh = make_mesh(**axes)
    prompts = dialogue_prompts(seed=3)  # 4 groups on 4 or 8 batch shards, 10 prompts on 12 or 16 rows
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    on_mesh = with_tokens(load_model(tiny_dirs["llama"], mesh=mesh), eos=10_000)
    single = generate_tree(model, prompts, max_new_tokens=NEW_TOKENS, sampler=TopP(0.9), seed=3, rows=ROWS)
    sharded = generate_tree(on_mesh, prompts, max_new_tokens=NEW_TOKENS, sampler=TopP(0.9), seed=3, rows=ROWS,
                            mesh=mesh)
    np.testing.assert_array_equal(sharded, single)


def test_batches_with_a_similar_shape_share_one_compilation(tiny_dirs):
    model = with_tokens(load_model(tiny_dirs["llama"]), eos=10_000)
    prompts = dialogue_prompts(seed=4)
    generate_tree(model, prompts, max_new_tokens=4, rows=ROWS)
    compiled = _tree_decode._cache_size()
    other = [p[:-1] for p in dialogue_prompts(seed=5)]  # other groups and lengths, same buckets
    assert len(nested_groups(other)) == 4
    generate_tree(model, other, max_new_tokens=4, rows=ROWS)
    assert _tree_decode._cache_size() == compiled


def test_bundled_model_samples_staged_dialogues_as_per_turn(shared_data, first_layers_model_path):
    """A sampling batch of make-prefs on staged train dialogues (donor personas, chat template), by
    the bundled model's tokenizer and first blocks."""
    from pdpo_jax.data import PromptEncoder, load_dialogues
    from pdpo_jax.data.examples import examples_from_dialogues

    train = shared_data / "personachat" / "parallel" / "src-train.txt"
    if not train.exists():
        pytest.skip(f"staged train dialogues not found at {train}")
    dialogues = load_dialogues(train)[:3]
    model = load_model(first_layers_model_path)
    encoder = PromptEncoder(model.tokenizer, "chat-en")
    donor = {d.id: dialogues[(i + 1) % len(dialogues)].persona for i, d in enumerate(dialogues)}
    examples = examples_from_dialogues(dialogues)[:8]
    prompts = [encoder.prompt_ids(donor[ex.dialogue_id], ex.history) for ex in examples]
    assert len(nested_groups(prompts)) <= 2  # eight turns of at most two dialogues
    ids, mask = right_padded(prompts, len(prompts), model.config.pad_token_id or 0)
    expected = generate(model, ids, mask, max_new_tokens=16, sampler=Greedy())
    np.testing.assert_array_equal(generate_tree(model, prompts, max_new_tokens=16), expected)
