"""`pdpo serve` of the bundled model, driven by the `openai` SDK: chat and completions, streamed
and not, greedy equal to `generate` token for token; 32 concurrent requests equal to their
one-at-a-time outputs; bad input answered with its status while the server keeps serving; a
client gone mid-stream frees its slot.

One server for the module (`served`): loading the model and compiling the step and a few prompt
widths costs about a minute on two CPU cores; the tests after that take seconds each.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx2 as httpx
import numpy as np
import openai
import pytest
import yaml

from pdpo_jax.generation import generate
from pdpo_jax.model import eos_ids, load_model
from pdpo_jax.serve import BackgroundServer, ServeOptions, build_service

SLOTS = 8
MAX_MODEL_LEN = 256
NEW_TOKENS = 10
TOPICS = ["cats", "rain", "chess", "bread", "the sea", "jazz", "mountains", "trains", "coffee", "winter", "owls",
          "gardens", "bicycles", "the moon", "libraries", "soup"]


@pytest.fixture(scope="module")
def served(default_model_path):
    model = load_model(default_model_path)
    service = build_service(model, ServeOptions(slots=SLOTS, max_model_len=MAX_MODEL_LEN))
    with BackgroundServer(service) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        yield model, service, server, client


def reference(model, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    """`generate`'s greedy tokens for one prompt alone, cut before the first end of sequence."""
    ids = np.asarray([prompt_ids])
    tokens = generate(model, ids, np.ones_like(ids), max_new_tokens=new_tokens)[0].tolist()
    stops = eos_ids(model)
    return tokens[: next((i for i, t in enumerate(tokens) if t in stops), len(tokens))]


def reference_text(model, prompt_ids: list[int], new_tokens: int = NEW_TOKENS) -> str:
    return model.tokenizer.decode(reference(model, prompt_ids, new_tokens), skip_special_tokens=True)


def chat(topic: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "You answer in one sentence."},
            {"role": "user", "content": f"Tell me something about {topic}."}]


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=30).json()


def test_chat_greedy_equals_generate_streamed_and_not(served):
    model, service, server, client = served
    messages = chat("cats")
    expected = reference_text(model, service.render_chat(messages))
    whole = client.chat.completions.create(model=service.served_name, messages=messages, max_tokens=NEW_TOKENS,
                                           temperature=0)
    assert whole.choices[0].message.content == expected
    assert whole.usage.prompt_tokens == len(service.render_chat(messages))
    assert whole.usage.completion_tokens <= NEW_TOKENS
    pieces = client.chat.completions.create(model=service.served_name, messages=messages, max_tokens=NEW_TOKENS,
                                            temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(pieces)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_completions_greedy_tokens_equal_generate_with_logprobs(served):
    model, service, server, client = served
    prompt = "The three primary colors are"
    ids = service.encode(prompt)
    expected = reference(model, ids)
    whole = client.completions.create(model=service.served_name, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0,
                                      logprobs=3)
    choice = whole.choices[0]
    assert choice.text == model.tokenizer.decode(expected, skip_special_tokens=True)
    assert choice.logprobs.tokens == [model.tokenizer.decode([t]) for t in expected]
    for token, logprob, top in zip(choice.logprobs.tokens, choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert len(top) == 3 and max(top.values()) == pytest.approx(logprob)  # greedy: the chosen token is the best
    streamed = client.completions.create(model=service.served_name, prompt=ids, max_tokens=NEW_TOKENS, temperature=0,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == choice.text


def test_32_concurrent_greedy_requests_equal_their_one_at_a_time_outputs(served):
    model, service, server, client = served
    conversations = [chat(f"{topic}, {mood}") for topic in TOPICS for mood in ("briefly", "warmly")]
    assert len(conversations) == 32
    expected = [reference_text(model, service.render_chat(m)) for m in conversations]

    def ask(messages):
        answer = client.chat.completions.create(model=service.served_name, messages=messages, max_tokens=NEW_TOKENS,
                                                temperature=0)
        return answer.choices[0].message.content

    with ThreadPoolExecutor(len(conversations)) as pool:
        answers = list(pool.map(ask, conversations))
    assert answers == expected
    assert health(server)["busy"] == 0


def test_n_choices_and_stop_strings(served):
    model, service, server, client = served
    messages = chat("owls")
    expected = reference_text(model, service.render_chat(messages), 24)
    cut = expected.split(" ")[3]
    hits = health(server)["prompt_cache"]["hits"]
    answer = client.chat.completions.create(model=service.served_name, messages=messages, max_tokens=24, temperature=0,
                                            n=2, stop=[cut])
    assert [c.message.content for c in answer.choices] == [expected[: expected.index(cut)]] * 2
    assert health(server)["prompt_cache"]["hits"] >= hits + 1  # the second choice's prompt was not prefilled again
    assert [c.finish_reason for c in answer.choices] == ["stop", "stop"]


def post(server, path: str, body, headers: dict | None = None) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + path, content=content, headers={"content-type": "application/json",
                                                                   **(headers or {})}, timeout=120)


def test_bad_input_gets_its_status_and_the_server_keeps_serving(served):
    model, service, server, client = served
    name = service.served_name
    ok = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "temperature": 0}
    cases = [
        ("/v1/chat/completions", b"{not json", 400, "invalid_json"),
        ("/v1/chat/completions", [1, 2], 400, "invalid_json"),
        ("/v1/chat/completions", {**ok, "model": "gpt-4o"}, 404, "model_not_found"),
        ("/v1/chat/completions", {**ok, "temperature": "hot"}, 422, "invalid_value"),
        ("/v1/chat/completions", {**ok, "max_tokens": 0}, 422, "invalid_value"),
        ("/v1/chat/completions", {**ok, "messages": []}, 422, "invalid_value"),
        ("/v1/chat/completions", {**ok, "frequency_penalty": 1.0}, 422, "unsupported_parameter"),
        ("/v1/chat/completions", {**ok, "messages": [{"role": "user", "content": "word " * MAX_MODEL_LEN}]}, 400,
         "context_length_exceeded"),
        ("/v1/completions", {"model": name, "prompt": "hi", "max_tokens": MAX_MODEL_LEN}, 400,
         "context_length_exceeded"),
        ("/v1/completions", {"model": name, "prompt": [10**9]}, 422, "invalid_value"),
        ("/v1/nothing", ok, 404, "not_found"),
    ]
    for path, body, status, code in cases:
        response = post(server, path, body)
        assert (response.status_code, response.json()["error"]["code"]) == (status, code), (path, body)
    assert post(server, "/v1/chat/completions", ok).status_code == 200
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], top_p=0)


def test_a_full_queue_answers_429_with_retry_after_and_a_key_is_checked(served):
    model, service, server, client = served
    ok = {"model": service.served_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    bound = service.scheduler.max_waiting
    service.scheduler.max_waiting = 0  # every request now finds the queue full
    try:
        response = post(server, "/v1/chat/completions", ok)
    finally:
        service.scheduler.max_waiting = bound
    assert response.status_code == 429 and response.headers["retry-after"] == "1"
    assert response.json()["error"]["type"] == "rate_limit_error"
    service.api_key = "s3cret"
    try:
        assert post(server, "/v1/chat/completions", ok).status_code == 401
        assert post(server, "/v1/chat/completions", ok, {"authorization": "Bearer wrong"}).status_code == 401
        assert post(server, "/v1/chat/completions", ok, {"authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(server.url + "/health").status_code == 200  # health needs no key
    finally:
        service.api_key = None


def test_a_client_gone_mid_stream_frees_its_slot(served):
    model, service, server, client = served
    body = {"model": service.served_name, "messages": chat("trains"), "max_tokens": MAX_MODEL_LEN - 64,
            "temperature": 0.8, "seed": 1, "stream": True}
    with httpx.Client(timeout=120) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body) as response:
            lines = response.iter_lines()
            received = [next(lines) for _ in range(6)]  # a few chunks: the request holds a slot now
            assert all(line.startswith("data: ") or not line for line in received)
            assert health(server)["busy"] == 1
    deadline = time.monotonic() + 60
    while health(server)["busy"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health(server)["busy"] == 0
    # every slot serves again: SLOTS requests at once all finish
    with ThreadPoolExecutor(SLOTS) as pool:
        answers = list(pool.map(lambda topic: client.chat.completions.create(
            model=service.served_name, messages=chat(topic), max_tokens=3, temperature=0), TOPICS[:SLOTS]))
    assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)


def test_models_and_health(served):
    model, service, server, client = served
    assert [m.id for m in client.models.list().data] == [service.served_name]
    client.completions.create(model=service.served_name, prompt="Hello", max_tokens=2, temperature=0)
    state = health(server)
    assert state["slots"] == SLOTS and state["max_model_len"] == MAX_MODEL_LEN
    assert state["compiled"]["step_views"]  # the shapes compiled so far (one request's at least) are reported
    engine = service.engine  # and the compiles queued in the background: steps, prefills and restores, commits
    assert 0 <= state["compiling"] <= len(engine.step_shapes()) + 2 * len(engine.prompt_widths()) + \
        len(engine.step_row_counts())
    assert set(state["prompt_cache"]) == {"entries", "bytes", "budget_bytes", "hits", "misses"}


def test_cli_refuses_a_negative_prompt_cache_before_loading_anything():
    from pdpo_jax.errors import UsageError
    from pdpo_jax.stages import serve

    with pytest.raises(UsageError, match="--prompt-cache-mib >= 0"):
        serve.main(["--prompt-cache-mib", "-1", "--model", "/nonexistent"])


PERSONA = ["i have two cats.", "i live in paris.", "i am a baker."]
DIALOGUE = ["hi! do you have pets?", "yes, two cats. and you?", "a dog. what do you do for work?"]


def persona_messages(persona: list[str], dialogue: list[str]) -> list[dict[str, str]]:
    roles = ["user" if (len(dialogue) - i) % 2 else "assistant" for i in range(len(dialogue))]
    return [{"role": "system", "content": "\n".join(persona)},
            *({"role": role, "content": text} for role, text in zip(roles, dialogue))]


def test_a_persona_template_renders_messages_as_training_builds_prompts(default_model_path):
    """The system message's lines are the persona, the rest the dialogue: the ids are the encoder's,
    as training, `pdpo generate` and test-responses build them; a dialogue out of turn is a 422."""
    from pdpo_jax.data.tokenization import PromptEncoder
    from pdpo_jax.serve.prompts import persona_renderer
    from pdpo_jax.serve.protocol import ApiError

    tokenizer = load_model(default_model_path).tokenizer
    for name in ("chat-en", "plain-en"):
        encoder = PromptEncoder(tokenizer, name)
        render = persona_renderer(encoder)
        assert render(persona_messages(PERSONA, DIALOGUE)) == encoder.prompt_ids(PERSONA, DIALOGUE)
        assert render(persona_messages([], DIALOGUE[-1:])[1:]) == encoder.prompt_ids([], DIALOGUE[-1:])
        ends_with_the_model = persona_messages(PERSONA, DIALOGUE[:1]) + [{"role": "assistant", "content": "hi"}]
        with pytest.raises(ApiError, match=r"messages\[1\].role: .* expected assistant, got user"):
            render(ends_with_the_model)
        with pytest.raises(ApiError, match="needs a user message"):
            render(persona_messages(PERSONA, []))


def test_serve_with_a_persona_template_answers_as_generate_does(served):
    """`--template plain-en`: a chat request's greedy reply is `generate`'s on the prompt training
    builds for that persona and dialogue, with the tokenizer's chat template out of the way."""
    from pdpo_jax.data.tokenization import PromptEncoder

    model, *_ = served
    service = build_service(model, ServeOptions(slots=2, max_model_len=MAX_MODEL_LEN, persona_template="plain-en"))
    prompt = PromptEncoder(model.tokenizer, "plain-en").prompt_ids(PERSONA, DIALOGUE)
    assert model.tokenizer.decode(prompt).startswith("Your persona:\n- i have two cats.")
    with BackgroundServer(service) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        reply = client.chat.completions.create(model=service.served_name, messages=persona_messages(PERSONA, DIALOGUE),
                                               max_tokens=NEW_TOKENS, temperature=0)
        assert reply.usage.prompt_tokens == len(prompt)
        assert reply.choices[0].message.content == reference_text(model, prompt)
        out_of_turn = persona_messages(PERSONA, DIALOGUE[:1]) + [{"role": "assistant", "content": "hi"}]
        out_of_turn = post(server, "/v1/chat/completions", {"model": service.served_name, "max_tokens": 2,
                                                             "messages": out_of_turn})
        assert out_of_turn.status_code == 422 and "alternate user and assistant" in out_of_turn.json()["error"]["message"]


def test_cli_refuses_two_ways_of_rendering_messages_and_an_unknown_template():
    from pdpo_jax.data.templates import TemplateError
    from pdpo_jax.errors import UsageError
    from pdpo_jax.stages import serve

    with pytest.raises(UsageError, match="give one"):
        serve.main(["--template", "plain-en", "--chat-template", "t.jinja", "--model", "/nonexistent"])
    with pytest.raises(TemplateError, match="no-such"):
        serve.main(["--template", "no-such", "--model", "/nonexistent"])


def write_run_config(tmp_path, model_path: str) -> str:
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"run_dir": str(tmp_path / "run"),
                                      "model": {"path": model_path, "dtype": "bfloat16", "scan_layers": True},
                                      "mesh": {"data": 2, "fsdp": 1, "tensor": 2}}))
    return str(config)


def test_a_run_config_gives_the_model_and_the_mesh_and_flags_win_over_it(tmp_path):
    from pdpo_jax.stages import serve

    config = write_run_config(tmp_path, "runs/x/dpo/best")
    settings = serve.model_settings(serve.build_parser().parse_args(["--config", config, "mesh.data=4"]))
    assert settings == ("runs/x/dpo/best",
                        {"compute_dtype": "bfloat16", "remat": False, "scan_layers": True, "allow_pickle": False},
                        {"data": 4, "fsdp": 1, "tensor": 2})
    flags = ["--config", config, "--model", "default", "--dtype", "float32", "--mesh", "none"]
    assert serve.model_settings(serve.build_parser().parse_args(flags)) == (
        "default", {"compute_dtype": "float32", "remat": False, "scan_layers": True, "allow_pickle": False}, None)
    assert serve.model_settings(serve.build_parser().parse_args([])) == ("default", {"compute_dtype": "float32"}, None)


def test_serve_with_a_run_config_loads_its_model_over_its_mesh(default_model_path, tmp_path, monkeypatch):
    """`pdpo serve --config FILE KEY=VALUE`: the service it would serve holds the config's model,
    laid out as its layers are scanned, over the config's mesh with the override applied."""
    from pdpo_jax.stages import serve

    served = {}
    monkeypatch.setattr(serve, "serve_forever", lambda service, host, port, **_: served.update(service=service))
    config = write_run_config(tmp_path, str(default_model_path))
    assert serve.main(["--config", config, "mesh.data=4", "--dtype", "float32", "--slots", "4"]) == 0
    engine = served["service"].engine
    assert dict(engine.mesh.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    assert engine.model.path == default_model_path and engine.slots == 4
    assert engine.model.config.scan_layers and engine.model.config.dtype == "float32"


def test_cli_refuses_a_missing_model_in_one_line(subprocess_env, tmp_path):
    done = subprocess.run([sys.executable, "-m", "pdpo_jax.cli", "serve", "--model", str(tmp_path / "none")],
                          capture_output=True, text=True, env=subprocess_env, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("pdpo serve: ") and "not found" in done.stderr


def test_a_request_in_flight_finishes_during_the_drain_and_new_ones_get_503(served):
    """Its own server of two slots (the module's keeps serving the other tests): ~30 s of compiles."""
    model = served[0]
    service = build_service(model, ServeOptions(slots=2, max_model_len=MAX_MODEL_LEN))
    budget = 48
    ids = service.encode("Once upon a time, in a village by the sea, there lived")
    expected = model.tokenizer.decode(reference(model, ids, budget), skip_special_tokens=True)
    body = {"model": service.served_name, "prompt": ids, "max_tokens": budget, "temperature": 0}
    server = BackgroundServer(service, drain_seconds=300)
    with server:
        with httpx.Client(timeout=300) as http:
            with http.stream("POST", server.url + "/v1/completions", json={**body, "stream": True}) as response:
                lines = response.iter_lines()
                pieces = [next(lines)]  # the first token is out: the request holds a slot
                drain = threading.Thread(target=server.stop, kwargs={"drain": True})
                drain.start()
                deadline = time.monotonic() + 30
                while health(server)["status"] != "draining" and time.monotonic() < deadline:
                    time.sleep(0.05)
                refused = post(server, "/v1/completions", body)
                still_running = health(server)["busy"]
                pieces += list(lines)
        drain.join(120)
    assert (refused.status_code, refused.json()["error"]["code"]) == (503, "shutting_down")
    assert still_running == 1
    events = [json.loads(line[len("data: "):]) for line in pieces if line.startswith("data: {")]
    assert pieces[-2:] == ["data: [DONE]", ""] or [p for p in pieces if p][-1] == "data: [DONE]"
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert not drain.is_alive() and not server.thread.is_alive()
