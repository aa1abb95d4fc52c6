"""What a judge endpoint sends back can fail one pair, never the run: answers that are no chat
completion, hold no text or echo the API key (docs/bad-input.md, "Judge endpoint")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from raw_endpoint_fixtures import RawAnswer, RawEndpoint, RawRequest, completion

from pdpo_jax import cli
from pdpo_jax.evaluate.judge_client import JudgmentCache

KEY_ENV = "PDPO_TEST_JUDGE_KEY"
KEY = "sk-test-ECHOED-4c1d9e2b77a0"
PAIRS = 2


@pytest.fixture(autouse=True)
def _key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def responses_files(folder: Path, pairs: int = PAIRS) -> list[str]:
    files = []
    for model in ("alpha", "beta"):
        path = folder / f"{model}.jsonl"
        path.write_text("".join(json.dumps({"id": str(i), "persona": ["i have a cat."], "history": ["hi"],
                                            "response": f"{model} {i}", "model": model}) + "\n"
                                for i in range(pairs)))
        files.append(str(path))
    return files


def judge(endpoint: RawEndpoint, folder: Path, capsys) -> tuple[int, str]:
    argv = ["judge", "--responses", *responses_files(folder), "--out", str(folder / "out"),
            "--base-url", endpoint.base_url, "--judge-model", "m", "--api-key-env", KEY_ENV, "--max-retries", "0",
            "--timeout", "10", "--no-plots", "--bootstrap", "10"]
    capsys.readouterr()
    status = cli.main(argv)
    return status, capsys.readouterr().err


def rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "out" / "judgments.jsonl").read_text().splitlines()]


MALFORMED = {
    "plain text": RawAnswer(body=b"all good", headers=(("Content-Type", "text/plain"),)),
    "html": RawAnswer(body=b"<html><body>gateway</body></html>", headers=(("Content-Type", "text/html"),)),
    "choices a string": RawAnswer(body=b'{"choices": "abc"}'),
    "message null": RawAnswer(body=b'{"choices": [{"message": null}]}'),
    "content a number": RawAnswer(body=completion(12345)),
    "broken json": RawAnswer(body=b"{not json"),
    "a json list": RawAnswer(body=b"[1, 2]"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_an_answer_that_is_no_chat_completion_fails_its_pairs_not_the_run(name, tmp_path, capsys):
    with RawEndpoint(lambda request: MALFORMED[name]) as endpoint:
        status, error = judge(endpoint, tmp_path, capsys)
    assert status == 1, error
    assert "internal error" not in error and "Traceback" not in error
    assert f"{PAIRS} judgments failed; rerun to retry them" in error
    judged = rows(tmp_path)
    assert [r["status"] for r in judged] == ["failed"] * PAIRS
    assert all("endpoint" in order["error"] for r in judged for order in r["orders"])
    results = json.loads((tmp_path / "out" / "judge_results.json").read_text())
    assert results["status"]["failed"] == PAIRS


@pytest.mark.parametrize("body", [b'{"choices": []}', b'{"choices": null}', b"{}", completion(None), completion("  ")])
def test_an_answer_without_text_is_never_cached_and_a_rerun_asks_again(body, tmp_path, capsys):
    with RawEndpoint(lambda request: RawAnswer(body=body)) as endpoint:
        status, _ = judge(endpoint, tmp_path, capsys)
        assert status == 1
        first = len(endpoint.requests)
    assert first == 2 * PAIRS
    cache = tmp_path / "out" / "judge_cache.jsonl"
    assert not cache.exists() or len(JudgmentCache(cache)) == 0

    with RawEndpoint(lambda request: RawAnswer(body=completion("alpha is better. [[1]]"))) as fixed:
        status, error = judge(fixed, tmp_path, capsys)
        assert len(fixed.requests) == 2 * PAIRS  # every order asked again
    assert status == 0, error
    assert [r["status"] for r in rows(tmp_path)] == ["ok"] * PAIRS


def test_an_empty_answer_left_in_an_older_cache_is_asked_again(tmp_path, capsys):
    with RawEndpoint(lambda request: RawAnswer(body=completion("fine [[3]]"))) as endpoint:
        judge(endpoint, tmp_path, capsys)
    cache = tmp_path / "out" / "judge_cache.jsonl"
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    cache.write_text("".join(json.dumps({**r, "text": ""}) + "\n" for r in records))
    with RawEndpoint(lambda request: RawAnswer(body=completion("fine [[3]]"))) as endpoint:
        status, _ = judge(endpoint, tmp_path, capsys)
        asked = [json.loads(request.body)["messages"] for request in endpoint.requests]
    assert len(asked) == 2 * PAIRS
    assert all(len(messages) == 2 for messages in asked)  # the questions again, not a re-ask of ""
    assert status == 0


def echo(request: RawRequest) -> RawAnswer:
    """A 200 whose answer quotes the request, credentials and all, as a careless proxy might."""
    return RawAnswer(body=completion(f"You sent {request.authorization} and {request.body[:40]!r}. [[1]]",
                                     echoed_headers=dict(request.headers)))


def test_an_endpoint_that_echoes_the_key_in_a_200_answer_gets_it_redacted_everywhere(tmp_path, capsys):
    with RawEndpoint(echo) as endpoint:
        status, error = judge(endpoint, tmp_path, capsys)
    assert status == 0, error
    assert all(request.authorization == f"Bearer {KEY}" for request in endpoint.requests)
    written = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert {"judge_cache.jsonl", "judgments.jsonl", "judge_results.json"} <= {path.name for path in written}
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    assert "Bearer ***" in (tmp_path / "out" / "judge_cache.jsonl").read_text()
    assert KEY not in error
