"""One process of the two-process `pdpo serve` in test_serve_multihost.py (run as a script, not collected).

The parent sets the standard JAX_* variables with PDPO_DISTRIBUTED=1 and two CPU devices per
process. Both processes load the tiny model onto one mesh over all four devices; process 0 runs
the scheduler through a `LeaderEngine` (two rounds of greedy jobs, more jobs than slots, with an
idle pause between them so the keepalive ticks), the other follows. Each writes what it saw to
`<out>/process_<i>.json`.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
from pathlib import Path

import jax

from pdpo_jax import parallel
from pdpo_jax.model import load_model
from pdpo_jax.serve.engine import SlotRequest
from pdpo_jax.serve.lockstep import LeaderEngine, follow
from pdpo_jax.serve.scheduler import Job, Scheduler
from pdpo_jax.serve.server import ServeOptions, build_engine


def run_round(scheduler: Scheduler, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    tokens = [[] for _ in prompts]
    done = threading.Semaphore(0)
    for index, prompt in enumerate(prompts):
        scheduler.submit(Job(SlotRequest(tuple(prompt)), new_tokens,
                             lambda token, index=index: tokens[index].append(token.id) or False,
                             lambda reason: done.release()))
    for _ in prompts:
        assert done.acquire(timeout=300)
    return tokens


def main(argv: list[str]) -> int:
    model_dir, spec_path, out = Path(argv[0]), Path(argv[1]), Path(argv[2])
    spec = json.loads(spec_path.read_text())
    assert parallel.initialize_distributed(), "the environment should ask for a distributed run"
    mesh = parallel.make_mesh(data=2, tensor=2)
    model = load_model(model_dir, mesh=mesh)
    model = dataclasses.replace(model, config=model.config.replace(eos_token_id=spec["never"], pad_token_id=0),
                                tokenizer=None)
    engine = build_engine(model, ServeOptions(slots=spec["slots"], max_model_len=spec["max_model_len"]), mesh)
    record: dict = {"process": jax.process_index()}
    if parallel.is_primary():
        leader = LeaderEngine(engine)
        scheduler = Scheduler(leader, stop_ids=(spec["never"],), max_waiting=64)
        scheduler.start()
        half = len(spec["prompts"]) // 2
        record["tokens"] = run_round(scheduler, spec["prompts"][:half], spec["new_tokens"])
        time.sleep(2.5)  # idle: the followers hear keepalives meanwhile
        record["tokens"] += run_round(scheduler, spec["prompts"][half:], spec["new_tokens"])
        scheduler.stop()
        leader.close()
        record["steps"] = scheduler.steps
    else:
        record["steps"] = follow(engine)
    record["prompt_cache"] = engine.prompt_cache.describe()
    (out / f"process_{jax.process_index()}.json").write_text(json.dumps(record))
    print(f"[process {jax.process_index()}] done after {record['steps']} steps", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
