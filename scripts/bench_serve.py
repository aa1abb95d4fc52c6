"""Throughput and latency of `pdpo serve` against `transformers serve --continuous-batching`.

Both serve the same model (the bundled SmolLM2-135M-Instruct as a Hugging Face directory,
written by our GGUF import, unless --model names another) on this machine, one after the other.
For each number of concurrent clients, every client sends the test turns' prompts of a run
config (persona + history through the config's template, as `pdpo test-responses` asks them)
through the `openai` SDK, streamed, greedy, with the same token budget. Printed per server and
client count: output tokens/s, the model's matmul GFLOP/s over the measurement (prompt and
generated tokens through the same parameter count for both servers: how close each comes to what
the machine's cores can multiply), p50/p95 request latency, p50 time to first token; the last line
is `serve_speedup=W`, ours over transformers' throughput at the largest client count.

Each client sends the config's few prompts again and again, so a server that keeps what it
prefilled (ours keeps whole prompts, `--prompt-cache-mib`; transformers shares a prompt's full
KV blocks) prefills each prompt once. `--distinct` puts a number of its own at the start of every
request's prompt: nothing is reused, the workload of prompts seen once (a judge's, a study's).

    python scripts/bench_serve.py                               # 1, 4, 16 clients
    python scripts/bench_serve.py --clients 1 2 --requests 4    # a smoke run
    python scripts/bench_serve.py --only pdpo                   # ours alone (no comparison line)
    python scripts/bench_serve.py --distinct                    # every request's prompt unique
    python scripts/bench_serve.py --steps                       # the engine's decode step alone
    python scripts/bench_serve.py --profile                     # CPU s per token in-process, split up
    python scripts/bench_serve.py --prefill-together --clients 2 4 8   # batched prefill: gain, exactness

`transformers serve` needs FastAPI (`pip install fastapi`); without it the comparison is refused
in one line. Measure on a quiet machine: other work on the cores changes every figure.
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pdpo_jax.huge_pages import describe as huge_pages_setting, restart_with_huge_pages  # noqa: E402

KEY = "bench"
READY_SECONDS = 1800


def test_turn_prompts(config_path: str) -> list[list[dict[str, str]]]:
    """The chat messages of the config's test turns (system = persona block, then the history)."""
    from pdpo_jax.config import load_config
    from pdpo_jax.data.corpus import pick_test_turns, prepare_corpus
    from pdpo_jax.data.templates import chat_messages, load_template

    config = load_config(config_path)
    turns = pick_test_turns(prepare_corpus(config.data, config.seed), None, 0)
    template = load_template(config.data.template)
    return [chat_messages(template, turn.persona, turn.history) for turn in turns]


def run_seconds(call, repeats: int) -> list[float]:
    """Wall seconds of each of `repeats` calls of `call`, which returns once its work is done (the
    caller runs it once before, so that no compile is timed)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """A server process, up once /v1/models answers; stopped with SIGINT (then killed)."""

    def __init__(self, command: list[str], port: int, env: dict[str, str]):
        self.root = f"http://127.0.0.1:{port}"
        self.url = f"{self.root}/v1"
        self.log = open(os.devnull, "w")
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, client) -> str:
        deadline = time.monotonic() + READY_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"bench_serve: {self.process.args[:3]} exited with {self.process.returncode}")
            try:
                return client.models.list().data[0].id
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(1)
        raise SystemExit(f"bench_serve: {self.url} not up after {READY_SECONDS} s")

    def health(self) -> dict | None:
        """`pdpo serve`'s /health (None from a server without one)."""
        import json
        import urllib.request

        try:
            with urllib.request.urlopen(self.root + "/health", timeout=30) as response:
                state = json.load(response)
        except Exception:  # noqa: BLE001 - transformers serve answers /health differently
            return None
        return state if "compiled" in state else None

    def wait_compiled(self) -> None:
        """Until a `pdpo serve --warm-up` has compiled every shape (at once for other servers)."""
        start = time.monotonic()
        while (state := self.health()) is not None and state.get("compiling"):
            if time.monotonic() - start > READY_SECONDS:
                raise SystemExit(f"bench_serve: still compiling after {READY_SECONDS} s")
            time.sleep(2)
        if state is not None and "compiling" in state:
            print(f"{'':>12} warmed up in {time.monotonic() - start:.0f} s more: {len(state['compiled']['step_shapes'])} "
                  f"step shapes, {len(state['compiled']['prompt_widths'])} prompt widths", flush=True)

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def model_flops(config) -> tuple[float, float]:
    """Matmul FLOPs of the model per prompt token and per generated token: 2 x the parameters of
    its blocks for every token, plus 2 x the unembedding's for a generated one (attention's
    products and a prefill's one row of logits not counted). The same count for both servers."""
    import jax
    import numpy as np

    from pdpo_jax.model.decoder import param_shapes

    leaves = jax.tree_util.tree_leaves_with_path(param_shapes(config))
    total = sum(int(np.prod(leaf.shape)) for _, leaf in leaves)
    embeddings = sum(int(np.prod(leaf.shape)) for path, leaf in leaves if "embedding" in jax.tree_util.keystr(path))
    unembedding = config.vocab_size * config.hidden_size
    blocks = total - embeddings - (0 if config.tie_word_embeddings else unembedding)
    return 2.0 * blocks, 2.0 * (blocks + unembedding)


def matmul_ceiling(config, rows: int = 256, repeats: int = 20) -> dict[str, float]:
    """This machine's GFLOP/s on the model's largest block matmul (`[rows, hidden] x [hidden,
    intermediate]`, fp32), by XLA and by PyTorch, best of `repeats`: about the most a server of
    this model can turn into tokens here, batching or not."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, config.hidden_size), np.float32)
    w = rng.standard_normal((config.hidden_size, config.intermediate_size), np.float32)
    flops = 2.0 * rows * config.hidden_size * config.intermediate_size

    def best(run) -> float:
        run()
        return flops / min(run_seconds(run, repeats)) / 1e9

    product = jax.jit(jnp.matmul)
    xj, wj = jnp.asarray(x), jnp.asarray(w)
    xt, wt = torch.from_numpy(x), torch.from_numpy(w)
    return {"xla": best(lambda: product(xj, wj).block_until_ready()), "torch": best(lambda: torch.matmul(xt, wt))}


def prompt_lengths(model_dir, prompts) -> list[int]:
    """Each prompt's tokens through the model's chat template: what both servers prefill, before padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [len(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=True)["input_ids"]) for messages in prompts]


def one_request(client, model: str, messages, max_tokens: int) -> tuple[float, float, int]:
    """(latency s, time to first token s, output tokens) of one streamed greedy request."""
    start = time.perf_counter()
    first, tokens = None, 0
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].delta.content:
            first = time.perf_counter() - start
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    latency = time.perf_counter() - start
    return latency, latency if first is None else first, tokens


REQUEST_NUMBERS = itertools.count()  # --distinct: no two requests of a run send the same prompt


def tagged(messages, number: int):
    """`messages` with the request's number at the very start of the first message, so that no
    prefix of one request's prompt is another's (no server can reuse any of its prefill)."""
    first = {**messages[0], "content": f"[request {number:06d}] {messages[0]['content']}"}
    return [first, *messages[1:]]


def load(client, model: str, prompts, clients: int, requests: int, max_tokens: int,
         distinct: bool = False) -> dict[str, float]:
    """`clients` threads, each sending `requests` prompts in turn (client c starts at prompt c);
    with `distinct`, each one tagged with a number of its own."""
    results: list[tuple[float, float, int, int]] = []  # latency, TTFT, output tokens, which prompt
    lock = threading.Lock()

    def run_client(c: int) -> None:
        for r in range(requests):
            which = (c + r * clients) % len(prompts)
            messages = tagged(prompts[which], next(REQUEST_NUMBERS)) if distinct else prompts[which]
            outcome = one_request(client, model, messages, max_tokens)
            with lock:
                results.append((*outcome, which))

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(run_client, range(clients)))
    elapsed = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"tokens_per_s": sum(r[2] for r in results) / elapsed,
            "p50_s": statistics.median(latencies),
            "p95_s": latencies[min(len(latencies) - 1, int(round(0.95 * (len(latencies) - 1))))],
            "ttft_p50_s": statistics.median(r[1] for r in results), "requests": len(results),
            "elapsed_s": elapsed, "output_tokens": sum(r[2] for r in results), "prompted": [r[3] for r in results]}


def measure(name: str, server: Server, prompts, args, flop_rate) -> dict[int, dict[str, float]]:
    """Each client count's figures; `flop_rate(row)` is the model's matmul GFLOP/s over a measurement."""
    import openai

    client = openai.OpenAI(base_url=server.url, api_key=KEY, max_retries=0, timeout=3600)
    try:
        model = server.wait_ready(client)
        server.wait_compiled()
        load(client, model, prompts, 1, len(prompts), args.max_tokens, args.distinct)  # warm-up: every prompt's shapes
        figures = {}
        for clients in args.clients:
            load(client, model, prompts, clients, 1, args.max_tokens, args.distinct)  # this concurrency's shapes
            before = server.health()
            figures[clients] = row = load(client, model, prompts, clients, args.requests, args.max_tokens,
                                          args.distinct)
            row["model_gflop_s"] = flop_rate(row)
            print(f"{name:>12} clients={clients:<3} tokens/s={row['tokens_per_s']:8.1f} "
                  f"model GFLOP/s={row['model_gflop_s']:5.1f} "
                  f"p50={row['p50_s']:6.2f}s p95={row['p95_s']:6.2f}s ttft_p50={row['ttft_p50_s']:6.2f}s "
                  f"requests={row['requests']}{compiled_during(before, server.health())}", flush=True)
        return figures
    finally:
        server.stop()


def compiled_during(before: dict | None, after: dict | None) -> str:
    """How many steps ran and programs compiled between two of `pdpo serve`'s /health answers."""
    if before is None or after is None:
        return ""
    new = {kind: len(after["compiled"][kind]) - len(before["compiled"][kind]) for kind in ("step_shapes", "prompt_widths")}
    reused = after["prompt_cache"]["hits"] - before["prompt_cache"]["hits"]
    prefilled = after["prompt_cache"]["misses"] - before["prompt_cache"]["misses"]
    return (f" steps={after['steps'] - before['steps']} compiled: {new['step_shapes']} step shapes, "
            f"{new['prompt_widths']} prompt widths; prompts reused {reused}, prefilled {prefilled}")


def profile(model_dir, prompts, slots: int, max_model_len: int, client_counts: list[int], requests: int,
            max_tokens: int) -> None:
    """The scheduler and engine in this process, no HTTP: `clients` threads each submitting
    `requests` prompts in turn, greedy; per client count, the CPU seconds of this process per
    generated token, split into decode steps, prefills and the rest (the scheduler's bookkeeping,
    the clients), with the steps, prefills and compiles counted. Every shape is compiled first."""
    import jax

    from pdpo_jax.model import eos_ids, load_model
    from pdpo_jax.serve.prompts import chat_renderer
    from pdpo_jax.serve.engine import SlotEngine, SlotRequest
    from pdpo_jax.serve.scheduler import Job, Scheduler

    model = load_model(model_dir)
    render = chat_renderer(model.tokenizer)
    prompt_ids = [tuple(render(messages)) for messages in prompts]
    engine = SlotEngine(model, slots=slots, max_model_len=max_model_len)
    start = time.process_time()
    engine.warm_up()
    while engine.pending_compiles():
        time.sleep(1)
    print(f"prompt lengths {[len(p) for p in prompt_ids]}; warm-up {time.process_time() - start:.0f} CPU s "
          f"({len(engine.step_shapes_compiled)} step shapes, {len(engine.widths_compiled)} prompt widths)", flush=True)
    spent: dict[str, float] = {}

    def timed(name, call):
        def run(*args):
            start = time.process_time()
            out = call(*args)
            jax.block_until_ready(engine.state)
            spent[name] = spent.get(name, 0.0) + time.process_time() - start
            spent[name + "s"] = spent.get(name + "s", 0) + 1
            return out
        return run

    engine.admit, engine.step = timed("prefill", engine.admit), timed("step", engine.step)
    scheduler = Scheduler(engine, stop_ids=eos_ids(model), max_waiting=4 * slots)
    scheduler.start()

    def run(clients: int, each: int) -> int:
        produced = []

        def client(c: int) -> None:
            for r in range(each):
                done = threading.Event()
                def on_token(token) -> bool:
                    produced.append(token.id)
                    return False

                scheduler.submit(Job(SlotRequest(prompt_ids[(c + r * clients) % len(prompt_ids)]), max_tokens,
                                     on_token, lambda reason: done.set()))
                done.wait()

        threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return len(produced)

    try:
        run(1, len(prompt_ids))
        for clients in client_counts:
            run(clients, 1)
            spent.clear()
            shapes = len(engine.step_shapes_compiled) + len(engine.widths_compiled)
            start, wall = time.process_time(), time.perf_counter()
            tokens = run(clients, requests)
            cpu, wall = time.process_time() - start, time.perf_counter() - wall
            steps, prefill = spent.get("steps", 0), spent.get("prefill", 0.0)
            print(f"clients={clients:<3} tokens={tokens} CPU s/token: {cpu / tokens * 1000:6.1f} ms (steps "
                  f"{spent.get('step', 0.0) / tokens * 1000:.1f}, prefills {prefill / tokens * 1000:.1f}, rest "
                  f"{(cpu - spent.get('step', 0.0) - prefill) / tokens * 1000:.1f}); steps={steps} "
                  f"mean busy {tokens / max(steps, 1):.1f}; prefills={spent.get('prefills', 0)}; "
                  f"compiles={len(engine.step_shapes_compiled) + len(engine.widths_compiled) - shapes}; "
                  f"{tokens / wall:.1f} tokens/s wall", flush=True)
    finally:
        scheduler.stop()


def prefill_together(model_dir, counts: list[int], width: int = 128, shortest: int = 100, repeats: int = 5) -> None:
    """What prefilling k waiting prompts in one call would give: k random prompts of `shortest` to
    `width` tokens, left-aligned to `width`, prefilled one at a time and as one batch; whether each prompt's
    logits and cache are bit for bit the same both ways (the engine's greedy output rests on that),
    and the median times."""
    from functools import partial

    import jax
    import jax.numpy as jnp
    import numpy as np

    from pdpo_jax.generation.decode import compute_params, prefill
    from pdpo_jax.model import init_cache, load_model

    model = load_model(model_dir)
    config = model.config
    params = jax.jit(partial(compute_params, config=config))(model.params)

    @jax.jit
    def run(params, ids, valid):
        cache = init_cache(config, ids.shape[0], ids.shape[1], dtype=jnp.dtype(config.dtype))
        logits, cache = prefill(params, ids, valid, cache, config=config)
        return logits, cache["k"], cache["v"]

    def median_s(call) -> float:
        return statistics.median(run_seconds(lambda: jax.block_until_ready(call()), repeats))

    rng = np.random.default_rng(0)
    for k in counts:
        ids, valid = np.zeros((k, width), np.int32), np.zeros((k, width), np.int32)
        for row in range(k):
            n = int(rng.integers(shortest, width + 1))
            ids[row, width - n:] = rng.integers(10, config.vocab_size, n)
            valid[row, width - n:] = 1
        together = jax.device_get(run(params, ids, valid))
        same = all(np.asarray(one)[0].tobytes() == np.asarray(many)[row].tobytes()
                   for row in range(k)
                   for one, many in zip(jax.tree.leaves(jax.device_get(run(params, ids[row:row + 1], valid[row:row + 1]))),
                                        jax.tree.leaves(together), strict=True))
        alone_s = median_s(lambda: [run(params, ids[row:row + 1], valid[row:row + 1]) for row in range(k)])
        together_s = median_s(lambda: run(params, ids, valid))
        print(f"prefill {k} prompts of width {width}: one at a time {1000 * alone_s:6.0f} ms, together "
              f"{1000 * together_s:6.0f} ms ({alone_s / together_s:.2f}x); each prompt's logits and cache "
              f"bit-identical both ways: {same}", flush=True)


def step_times(model_dir, slots: int, max_model_len: int, busy_counts: list[int], prompt_tokens: int = 200,
               repeats: int = 8) -> None:
    """The slot engine's decode step alone, no HTTP: the median time of one step with 1, 4, ...
    slots busy (each holding a `prompt_tokens`-token prompt) out of `slots`."""
    import numpy as np

    from pdpo_jax.model import load_model
    from pdpo_jax.serve.engine import SlotEngine, SlotRequest

    engine = SlotEngine(load_model(model_dir), slots=slots, max_model_len=max_model_len)
    prompt = tuple(range(10, 10 + prompt_tokens))
    for count in busy_counts:
        busy = np.zeros(slots, bool)
        busy[:count] = True
        for slot in range(count):
            engine.admit(slot, SlotRequest(prompt))
        engine.step(busy)  # compiles this shape
        times = run_seconds(lambda: engine.step(busy), repeats)
        print(f"step busy={count:<3} of {slots} slots: median {1000 * statistics.median(times):7.1f} ms, "
              f"fastest {1000 * min(times):7.1f} ms", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="default", help="model directory or `default` (default: %(default)s)")
    parser.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"),
                        help="run config whose test turns are the prompts (default: configs/demo.yaml)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--requests", type=int, default=8, help="requests per client per measurement")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--slots", type=int, default=None, help="pdpo serve --slots (default: the most clients)")
    parser.add_argument("--max-model-len", type=int, default=512)
    parser.add_argument("--prefill-together", action="store_true",
                        help="time prefilling --clients prompts one at a time and as one batch, and check whether "
                             "each prompt's prefill is bit-identical both ways (no HTTP)")
    parser.add_argument("--distinct", action="store_true",
                        help="make every request's prompt unique (a number at its start), so that neither server "
                             "reuses any prefill: the workload of prompts never seen twice (a judge's, a study's)")
    parser.add_argument("--prompt-cache-mib", type=int, default=None, metavar="MIB",
                        help="pdpo serve --prompt-cache-mib (default: the server's; 0 prefills every request, "
                             "as a workload of prompts never seen twice would)")
    parser.add_argument("--only", choices=("pdpo", "transformers"), default=None, help="measure one server only")
    parser.add_argument("--profile", action="store_true",
                        help="run the scheduler in this process, no HTTP, and split its CPU time per token into "
                             "decode steps, prefills and the rest (no servers)")
    parser.add_argument("--steps", action="store_true",
                        help="time the engine's decode step alone with as many busy slots as --clients, no servers")
    args = parser.parse_args()

    from pdpo_jax.model.loader import resolve_model_dir

    model_dir = resolve_model_dir(args.model)
    if args.prefill_together:
        prefill_together(model_dir, args.clients)
        return 0
    if args.steps:
        step_times(model_dir, args.slots or max(args.clients), args.max_model_len, args.clients)
        return 0
    prompts = test_turn_prompts(args.config)
    if args.profile:
        profile(model_dir, prompts, args.slots or max(args.clients), args.max_model_len, args.clients, args.requests,
                args.max_tokens)
        return 0
    print(f"model {model_dir}; {len(prompts)} test-turn prompts from {args.config}"
          f"{', each request numbered (--distinct)' if args.distinct else ''}; max_tokens={args.max_tokens}; "
          f"clients {args.clients} x {args.requests} requests; {huge_pages_setting()} for both servers", flush=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "BENCH_KEY": KEY}
    from pdpo_jax.model.checkpoint import read_config

    config = read_config(Path(model_dir))
    per_prompt_token, per_output_token = model_flops(config)
    lengths = prompt_lengths(model_dir, [tagged(p, 0) for p in prompts] if args.distinct else prompts)
    print(f"prompt tokens {lengths}; model matmul GFLOP per prompt token {per_prompt_token / 1e9:.3f}, "
          f"per generated token {per_output_token / 1e9:.3f}", flush=True)

    ceiling = matmul_ceiling(config)
    print(f"this machine's fp32 matmul ceiling ([256, hidden] x [hidden, intermediate], best of 20): "
          f"XLA {ceiling['xla']:.1f} GFLOP/s, PyTorch {ceiling['torch']:.1f} GFLOP/s", flush=True)

    def flop_rate(row) -> float:
        flops = per_prompt_token * sum(lengths[i] for i in row["prompted"]) + per_output_token * row["output_tokens"]
        return flops / row["elapsed_s"] / 1e9

    figures: dict[str, dict[int, dict[str, float]]] = {}
    if args.only in (None, "pdpo"):
        port = free_port()
        command = [sys.executable, "-m", "pdpo_jax.cli", "serve", "--model", str(model_dir), "--port", str(port),
                   "--slots", str(args.slots or max(args.clients)), "--max-model-len", str(args.max_model_len),
                   "--api-key-env", "BENCH_KEY", "--warm-up"]
        if args.prompt_cache_mib is not None:
            command += ["--prompt-cache-mib", str(args.prompt_cache_mib)]
        figures["pdpo"] = measure("pdpo serve", Server(command, port, env), prompts, args, flop_rate)
    if args.only in (None, "transformers"):
        try:
            import fastapi  # noqa: F401
        except ImportError:
            raise SystemExit("bench_serve: `transformers serve` needs FastAPI, which is not installed "
                             "(pip install fastapi; or --only pdpo)") from None
        port = free_port()
        command = [str(Path(sys.executable).with_name("transformers")), "serve", str(model_dir),
                   "--continuous-batching", "--device", "cpu", "--dtype", "float32", "--host", "127.0.0.1",
                   "--port", str(port)]
        figures["transformers"] = measure("transformers", Server(command, port, env), prompts, args, flop_rate)
    top = max(args.clients)
    if "pdpo" in figures:
        ours = figures["pdpo"]
        print(f"pdpo_scaling={ours[top]['tokens_per_s'] / ours[min(args.clients)]['tokens_per_s']:.2f} "
              f"({top} clients over {min(args.clients)})")
    if len(figures) == 2:
        print(f"serve_speedup={figures['pdpo'][top]['tokens_per_s'] / figures['transformers'][top]['tokens_per_s']:.2f}")
    return 0


if __name__ == "__main__":
    restart_with_huge_pages()  # ours and the peer alike: both run in this process or its children
    sys.exit(main())
