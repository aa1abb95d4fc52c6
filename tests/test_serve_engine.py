"""The slot engine and its scheduler on tiny random models (fast tier): greedy tokens equal
`generate`'s whatever shares the batch and whenever a request joins, slots are freed at once,
the queue is bounded, sampled tokens depend only on the request's own seed."""

from __future__ import annotations

import dataclasses
import threading

import jax
import numpy as np
import pytest

from model_fixtures import make_tiny_hf_model
from pdpo_jax.generation import generate
from pdpo_jax.model import load_model
from pdpo_jax.parallel import make_mesh
from pdpo_jax.serve.engine import MIN_VIEW, PromptTooLong, SlotEngine, SlotRequest, cache_length_for
from pdpo_jax.serve.scheduler import Job, QueueFull, Scheduler

NEW_TOKENS = 12
NEVER = 10_000  # an end-of-sequence id the tiny vocabulary never produces
MAX_LEN = 48


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve_engine")
    models = {}
    dirs = {family: make_tiny_hf_model(root, family, initializer_range=0.3) for family in ("llama", "gpt2")}
    # "llama-scanned": its blocks stacked and scanned, as the paper configs run on pods
    for name, family, scan_layers in (("llama", "llama", False), ("gpt2", "gpt2", False),
                                      ("llama-scanned", "llama", True)):
        model = load_model(dirs[family], scan_layers=scan_layers)
        models[name] = dataclasses.replace(
            model, config=model.config.replace(eos_token_id=NEVER, pad_token_id=0), tokenizer=None)
    return models


def prompts(count: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(int(t) for t in rng.integers(3, 120, size=int(rng.integers(2, 20)))) for _ in range(count)]


def one_at_a_time(model, prompt: tuple[int, ...], new_tokens: int = NEW_TOKENS) -> list[int]:
    ids = np.asarray([prompt])
    return generate(model, ids, np.ones_like(ids), max_new_tokens=new_tokens)[0].tolist()


def run_jobs(scheduler: Scheduler, requests: list[SlotRequest], max_tokens: int = NEW_TOKENS) -> list[list[int]]:
    """Submits every request at once and waits: each one's tokens."""
    tokens = [[] for _ in requests]
    done = threading.Semaphore(0)
    reasons = [None] * len(requests)
    for index, request in enumerate(requests):
        def on_token(token, index=index):
            tokens[index].append(token.id)
            return False

        def on_finish(reason, index=index):
            reasons[index] = reason
            done.release()

        scheduler.submit(Job(request, max_tokens, on_token, on_finish))
    for _ in requests:
        assert done.acquire(timeout=120)
    assert reasons == ["length"] * len(requests)
    return tokens


@pytest.mark.parametrize("family", ["llama", "gpt2", "llama-scanned"])
def test_greedy_tokens_equal_generate_when_requests_join_midway(tiny_models, family):
    model = tiny_models[family]
    engine = SlotEngine(model, slots=3, max_model_len=MAX_LEN)
    batch = prompts(5, seed=1)
    expected = [one_at_a_time(model, p) for p in batch]
    owner = {}
    # slot 0 starts alone, slot 2 joins after 3 steps, slot 1 after 5; slot 0 is reused at once
    schedule = {0: [(0, 0)], 3: [(2, 1)], 5: [(1, 2)]}
    produced = {i: [] for i in range(len(batch))}
    step = 0
    waiting = [3, 4]
    while step < 40 and any(len(produced[i]) < NEW_TOKENS for i in range(len(batch))):
        for slot, request in schedule.get(step, []):
            engine.admit(slot, SlotRequest(batch[request]))
            owner[slot] = request
        busy = np.array([slot in owner for slot in range(3)])
        result = engine.step(busy)
        for slot, request in list(owner.items()):
            produced[request].append(int(result.tokens[slot]))
            if len(produced[request]) == NEW_TOKENS:
                del owner[slot]
                if waiting:  # the freed slot takes the next request before the next step
                    request = waiting.pop(0)
                    engine.admit(slot, SlotRequest(batch[request]))
                    owner[slot] = request
        step += 1
    for request in range(len(batch)):
        assert produced[request] == expected[request], f"request {request}"


def test_scheduler_outputs_do_not_depend_on_batch_neighbours(tiny_models):
    model = tiny_models["llama"]
    batch = prompts(12, seed=2)
    expected = [one_at_a_time(model, p) for p in batch]
    scheduler = Scheduler(SlotEngine(model, slots=4, max_model_len=MAX_LEN), stop_ids=(NEVER,), max_waiting=64)
    scheduler.start()
    try:
        assert run_jobs(scheduler, [SlotRequest(p) for p in batch]) == expected
        alone = run_jobs(scheduler, [SlotRequest(batch[5])])
        assert alone == [expected[5]]
    finally:
        scheduler.stop()
    assert scheduler.busy_slots() == 0


def test_sampled_tokens_follow_the_request_seed_only(tiny_models):
    model = tiny_models["llama"]
    scheduler = Scheduler(SlotEngine(model, slots=4, max_model_len=MAX_LEN), stop_ids=(NEVER,), max_waiting=64)
    target = SlotRequest(prompts(1, seed=3)[0], temperature=1.0, top_p=0.9, seed=7)
    others = [SlotRequest(p, temperature=0.7, seed=i) for i, p in enumerate(prompts(5, seed=4))]
    scheduler.start()
    try:
        alone = run_jobs(scheduler, [target])[0]
        crowded = run_jobs(scheduler, [others[0], target, *others[1:]])[1]
        other_seed = run_jobs(scheduler, [dataclasses.replace(target, seed=8)])[0]
    finally:
        scheduler.stop()
    assert alone == crowded
    assert alone != other_seed


def test_a_cancelled_job_frees_its_slot_and_a_full_queue_refuses(tiny_models):
    model = tiny_models["llama"]
    scheduler = Scheduler(SlotEngine(model, slots=1, max_model_len=MAX_LEN), stop_ids=(NEVER,), max_waiting=2)
    started, finished = threading.Event(), []
    endless = Job(SlotRequest(prompts(1)[0]), MAX_LEN - 20, lambda token: started.set() or False,
                  lambda reason: finished.append(reason))
    scheduler.submit(endless)
    scheduler.submit(Job(SlotRequest(prompts(1)[0]), 1, lambda token: False, lambda reason: finished.append(reason)))
    with pytest.raises(QueueFull):
        scheduler.submit(Job(SlotRequest((5, 6)), 1, lambda token: False, lambda reason: None))
    scheduler.start()
    try:
        assert started.wait(60)
        endless.cancel()
        for _ in range(600):  # the cancelled job's slot goes to the waiting one, which finishes
            if len(finished) == 2:
                break
            threading.Event().wait(0.1)
        expected = one_at_a_time(model, prompts(1, seed=6)[0])
        assert run_jobs(scheduler, [SlotRequest(prompts(1, seed=6)[0])]) == [expected]
    finally:
        scheduler.stop()
    assert finished == ["cancelled", "length"]


def test_prompt_and_budget_must_fit_and_compiles_stay_bounded(tiny_models):
    engine = SlotEngine(tiny_models["llama"], slots=2, max_model_len=MAX_LEN)
    with pytest.raises(PromptTooLong, match="exceeds the context of 48"):
        engine.check_fits(40, 9)
    engine.check_fits(40, 8)
    assert cache_length_for(MAX_LEN) >= 44 + 8  # the widest bucket of a 40-token prompt, then 8 new tokens
    engine.admit(0, SlotRequest(tuple(range(3, 43))))
    for _ in range(8):
        engine.step(np.array([True, False]))
    assert engine.views_compiled <= {MIN_VIEW}  # 48 + 16 columns: one view, every step
    assert engine.step_shapes_compiled == {(1, MIN_VIEW)}  # one busy slot: a one-row step


def test_learned_positions_bound_the_context(tiny_models):
    with pytest.raises(ValueError, match="learned positions"):
        SlotEngine(tiny_models["gpt2"], slots=1, max_model_len=65)


@pytest.mark.parametrize("family", ["llama", "llama-scanned"])
def test_on_a_mesh_the_tokens_are_the_same(tiny_models, family):
    model = tiny_models[family]
    batch = prompts(4, seed=9)
    batch.append(batch[0])  # admitted again from its kept prefill, laid out over the mesh
    expected = [one_at_a_time(model, p) for p in batch]
    engine = SlotEngine(model, slots=4, max_model_len=MAX_LEN, mesh=make_mesh(data=4, tensor=2))
    scheduler = Scheduler(engine, stop_ids=(NEVER,), max_waiting=8)
    scheduler.start()
    try:
        assert run_jobs(scheduler, [SlotRequest(p) for p in batch]) == expected
    finally:
        scheduler.stop()
    assert engine.prompt_cache.hits == 1


def wait_for_compiles(engine: SlotEngine, seconds: float = 120) -> None:
    for _ in range(int(seconds * 10)):
        if not engine.pending_compiles():
            return
        threading.Event().wait(0.1)
    raise AssertionError(f"{engine.pending_compiles()} compiles still pending after {seconds} s")


def test_a_step_runs_at_a_compiled_covering_shape_while_its_own_compiles(tiny_models):
    model = tiny_models["llama"]
    engine = SlotEngine(model, slots=4, max_model_len=MAX_LEN)
    engine.steps.get((4, MIN_VIEW))
    engine.commits.get(4)
    prompt = prompts(1, seed=11)[0]
    engine.admit(1, SlotRequest(prompt))
    busy = np.array([False, True, False, False])
    # the one-row step is not compiled: the four-row one runs it while it compiles in the background
    assert engine.step_shape(busy) == (4, MIN_VIEW)
    tokens = [int(engine.step(busy).tokens[1]) for _ in range(NEW_TOKENS)]
    wait_for_compiles(engine)
    assert engine.step_shape(busy) == (1, MIN_VIEW)
    assert engine.step_shapes_compiled == {(1, MIN_VIEW), (4, MIN_VIEW)}
    assert tokens == one_at_a_time(model, prompt)


def test_warm_up_compiles_every_shape_and_nothing_compiles_afterwards(tiny_models):
    model = tiny_models["llama"]
    engine = SlotEngine(model, slots=3, max_model_len=MAX_LEN)
    assert engine.step_row_counts() == [1, 2, 3]
    assert engine.step_views() == [MIN_VIEW]  # 48 + 16 cache columns
    assert engine.prompt_widths() == [16, 32, 48]
    engine.warm_up()
    wait_for_compiles(engine)
    assert engine.step_shapes_compiled == {(1, MIN_VIEW), (2, MIN_VIEW), (3, MIN_VIEW)}
    assert engine.widths_compiled == {16, 32, 48}
    assert engine.commits.ready() == {1, 2, 3}
    assert engine.restores.ready() == {16, 32, 48}
    scheduler = Scheduler(engine, stop_ids=(NEVER,), max_waiting=16)
    batch = prompts(5, seed=12)
    scheduler.start()
    try:
        assert run_jobs(scheduler, [SlotRequest(p) for p in batch]) == [one_at_a_time(model, p) for p in batch]
    finally:
        scheduler.stop()
    assert engine.pending_compiles() == 0 and len(engine.step_shapes_compiled) == 3


def slot_row(engine: SlotEngine, slot: int) -> list[np.ndarray]:
    """Everything the state holds for one slot, as host arrays."""
    return [np.asarray(leaf)[slot] for leaf in jax.tree.leaves(engine.state)]


@pytest.mark.parametrize("family", ["llama", "llama-scanned"])
def test_a_repeated_prompt_is_restored_bit_for_bit_from_its_kept_prefill(tiny_models, family):
    model = tiny_models[family]
    prompt, other = prompts(2, seed=13)
    reusing = SlotEngine(model, slots=3, max_model_len=MAX_LEN)
    reusing.admit(0, SlotRequest(prompt))
    reusing.admit(2, SlotRequest(other))
    reusing.admit(1, SlotRequest(prompt))  # kept: written from the prefill slot 0 got
    assert reusing.prompt_cache.describe() | {"bytes": 0} == {"entries": 2, "bytes": 0, "hits": 1, "misses": 2,
                                                            "budget_bytes": 256 << 20}
    fresh = SlotEngine(model, slots=3, max_model_len=MAX_LEN, prompt_cache_bytes=0)
    fresh.admit(1, SlotRequest(prompt))  # the same slot, prefilled afresh
    assert fresh.prompt_cache.describe() == {"entries": 0, "bytes": 0, "budget_bytes": 0, "hits": 0, "misses": 1}
    for restored, prefilled in zip(slot_row(reusing, 1), slot_row(fresh, 1), strict=True):
        assert restored.tobytes() == prefilled.tobytes()
    busy = np.array([True, True, True])
    tokens = np.array([reusing.step(busy).tokens for _ in range(NEW_TOKENS)])
    assert tokens[:, 0].tolist() == tokens[:, 1].tolist() == one_at_a_time(model, prompt)
    assert tokens[:, 2].tolist() == one_at_a_time(model, other)
