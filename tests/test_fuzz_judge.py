"""The judge against a local endpoint that answers anything: random status codes, headers and bodies,
echoes of the request (its Authorization header among them). Every run ends in exit 0 or in
per-pair failures (exit 1, a rerun retries them), in bounded time, with no traceback, the API key
in no written file, and the answers cached before the run kept (docs/bad-input.md, "Judge endpoint")."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from fuzz_fixtures import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from raw_endpoint_fixtures import RawAnswer, RawEndpoint, RawRequest, completion

from pdpo_jax import cli

KEY_ENV = "PDPO_TEST_FUZZ_JUDGE_KEY"
KEY = "sk-fuzz-SECRET-0e7b3f9a21c4d8"
SECONDS = 60.0  # two orders, a re-ask and a retry each, against a 3 s client timeout
CACHED, FUZZED = "0", "1"  # the pair answered before the run, the pair the endpoint answers at random


def responses_files(folder: Path) -> list[str]:
    files = []
    for model in ("alpha", "beta"):
        path = folder / f"{model}.jsonl"
        path.write_text("".join(json.dumps({"id": i, "persona": ["i have a cat."], "history": [f"dialogue-{i}: hi"],
                                            "response": f"{model} {i}", "model": model}) + "\n"
                                for i in (CACHED, FUZZED)))
        files.append(str(path))
    return files


def judge_argv(endpoint: RawEndpoint, folder: Path) -> list[str]:
    return ["judge", "--responses", *responses_files(folder), "--out", str(folder / "out"),
            "--base-url", endpoint.base_url, "--judge-model", "m", "--api-key-env", KEY_ENV,
            "--max-retries", "1", "--backoff-base", "0.001", "--backoff-max", "0.01", "--timeout", "3",
            "--no-plots", "--bootstrap", "10"]


def pair_of(request: RawRequest) -> str | None:
    text = request.body.decode("utf-8", "replace")
    return next((i for i in (CACHED, FUZZED) if f"dialogue-{i}:" in text), None)


@pytest.fixture(scope="module")
def cached_run(tmp_path_factory) -> Path:
    """A judge output folder whose cache holds pair CACHED (a win for alpha in both orders) and
    nothing of pair FUZZED (its calls failed)."""
    folder = tmp_path_factory.mktemp("cached")

    def answer(request: RawRequest) -> RawAnswer:
        if pair_of(request) != CACHED:
            return RawAnswer(status=500, body=b'{"error": {"message": "down"}}')
        alpha_first = request.body.decode().index("alpha") < request.body.decode().index("beta")
        return RawAnswer(body=completion(f"alpha keeps the persona. [[{1 if alpha_first else 2}]]"))

    with pytest.MonkeyPatch.context() as patch, RawEndpoint(answer) as endpoint:
        patch.setenv(KEY_ENV, KEY)
        assert cli.main(judge_argv(endpoint, folder)) == 1
    return folder / "out" / "judge_cache.jsonl"


statuses = st.one_of(st.just(200), st.sampled_from([201, 204, 301, 400, 401, 403, 404, 408, 409, 413, 422, 429, 500,
                                                    502, 503, 504]), st.integers(200, 599))
header_values = st.one_of(st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=20),
                          st.sampled_from(["0", "1", "-5", "1e9", "nan", "Wed, 21 Oct 2015 07:28:00 GMT"]))
headers = st.lists(st.tuples(st.sampled_from(["Content-Type", "Retry-After", "retry-after-ms", "X-Request-Id",
                                              "Content-Encoding", "X-Echo"]), header_values), max_size=3)
content_types = st.sampled_from(["application/json", "text/plain", "text/html", "application/octet-stream", ""])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)
verdict_texts = st.sampled_from(["[[1]]", "[[2]]", "[[3]]", "no verdict here", "", "  ", "[[4]]", "[[1]] [[2]]"])
# How a body is made from the request it answers: most kinds quote the request, key and all.
body_kinds = st.sampled_from(["verdict", "echo in answer", "echo as error", "echo raw", "json", "bytes", "content"])


@st.composite
def answers(draw) -> dict:
    """What one reply is made of; `render` makes it from the request it answers."""
    status, kind = draw(statuses), draw(body_kinds)
    verdict, value, raw = draw(verdict_texts), draw(json_values), draw(st.binary(max_size=200))
    return {"status": status, "kind": kind, "verdict": verdict, "value": value, "raw": raw,
            "headers": (("Content-Type", draw(content_types)), *draw(headers))}


def render(made: dict, request: RawRequest) -> RawAnswer:
    echo = f"{request.authorization} {request.body[:60].decode('utf-8', 'replace')}"
    body = {
        "verdict": completion(f"reasons. {made['verdict']}"),
        "echo in answer": completion(f"you sent {echo} {made['verdict']}", echoed={"authorization": request.authorization}),
        "echo as error": json.dumps({"error": {"message": f"refused {echo}", "type": "x"}}).encode(),
        "echo raw": request.authorization.encode() + b"\n" + request.body,
        "json": json.dumps(made["value"]).encode(),
        "bytes": made["raw"],
        "content": completion(made["value"]),
    }[made["kind"]]
    echoed = tuple((name, request.authorization if name == "X-Echo" else value) for name, value in made["headers"])
    return RawAnswer(status=made["status"], body=body, headers=echoed)


@settings(max_examples=examples(0.5))
@given(script=st.lists(answers(), min_size=1, max_size=6))
def test_any_endpoint_answer_ends_in_a_result_or_a_per_pair_failure(cached_run, script, capsys, monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    calls = []

    def answer(request: RawRequest) -> RawAnswer:
        if pair_of(request) == CACHED:
            calls.append(CACHED)
        made = script[len(calls) % len(script)]
        calls.append(FUZZED)
        return render(made, request)

    with tempfile.TemporaryDirectory() as name, RawEndpoint(answer) as endpoint:
        folder = Path(name)
        (folder / "out").mkdir()
        before = cached_run.read_bytes()
        shutil.copy(cached_run, folder / "out" / "judge_cache.jsonl")
        capsys.readouterr()
        start = time.perf_counter()
        status = cli.main(judge_argv(endpoint, folder))
        seconds = time.perf_counter() - start
        error = capsys.readouterr().err

        assert seconds < SECONDS
        assert status in (0, 1), error
        assert "Traceback" not in error and "internal error" not in error, error
        if status == 1:
            assert error.rstrip("\n").splitlines()[-1].startswith("pdpo judge: 1 judgments failed; rerun"), error
        assert CACHED not in calls  # answered from the cache, not asked again
        rows = {row["id"]: row for row in map(json.loads, (folder / "out" / "judgments.jsonl").read_text().splitlines())}
        assert rows[CACHED]["status"] == "ok" and rows[CACHED]["outcome"] == "win"
        assert rows[FUZZED]["status"] in ("ok", "unparsable", "failed")
        assert (status == 1) == (rows[FUZZED]["status"] == "failed")
        assert (folder / "out" / "judge_cache.jsonl").read_bytes().startswith(before)  # nothing committed lost
        for path in folder.rglob("*"):
            if path.is_file():
                assert KEY.encode() not in path.read_bytes(), path
        assert KEY not in error
