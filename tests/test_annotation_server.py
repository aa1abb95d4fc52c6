"""The annotation server over 127.0.0.1: tokens (403 for anything else, one annotator's votes only),
clear 4xx answers to bad requests, 20 annotators voting at once, and votes surviving SIGKILL."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import pytest
from annotation_fixtures import (
    MARKUP,
    ServerProcess,
    get_json,
    http,
    link_of,
    pair_items,
    position_of,
    server_in_thread,
    vote,
)

from pdpo_jax.annotation.store import CHOICES, Study


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    study = Study.create(tmp_path_factory.mktemp("served") / "study.db", [*pair_items(4), MARKUP])
    tokens = {name: study.add_annotator(name) for name in ("alice", "bob")}
    with server_in_thread(study) as base:
        yield study, base, tokens


def test_a_missing_or_made_up_token_gets_403_and_nothing_else(served):
    study, base, tokens = served
    made_up = "A" * 43
    wrong = tokens["alice"][:-2] + ("xy" if tokens["alice"][-2:] != "xy" else "zz")
    for path in ("/", "/a/", "/a", "/api/state", "/page.js", f"/a/{made_up}/", f"/a/{made_up}/api/state",
                 f"/a/{wrong}/api/items/1", f"/a/{made_up}/page.js", f"/a/{made_up}", f"/a/{made_up}/nothing/here",
                 "/a/%2e%2e/api/state"):
        status, _, body = http(base + path)
        assert (status, body) == (403, b"forbidden"), path
    status, _, body = http(f"{base}/a/{made_up}/api/items/1/vote", body={"choice": "1"})
    assert (status, body) == (403, b"forbidden")
    status, _, body = http(f"{base}/anything", body={"choice": "1"}, method="PUT")
    assert (status, body) == (403, b"forbidden")
    assert study.votes(history=True) == []


def test_a_token_reads_and_writes_its_own_votes_only(served):
    study, base, tokens = served
    alice, bob = (link_of(base, tokens[n]) for n in ("alice", "bob"))
    bob_view = get_json(f"{bob}api/items/2")
    vote(bob, 2, "draw")
    alice_view = get_json(f"{alice}api/items/2")
    assert alice_view["choice"] is None and get_json(f"{alice}api/state")["done"] == 0
    bob_item = study.shown_item(study.annotator_for_token(tokens["bob"]), 2)
    alice_position = position_of(study, tokens["alice"], lambda shown: shown.number == bob_item.number)
    vote(alice, alice_position, "1")  # alice votes on the same item: bob's vote stays his
    assert get_json(f"{bob}api/items/2") == {**bob_view, "choice": "draw", "done": 1}
    assert {(v.annotator, v.item) for v in study.votes()} == {("bob", bob_item.number), ("alice", bob_item.number)}
    assert get_json(f"{alice}api/state")["annotator"] == "alice"


def test_responses_are_sent_as_data_and_the_page_allows_no_inline_script(served):
    study, base, tokens = served
    link = link_of(base, tokens["alice"])
    position = position_of(study, tokens["alice"], lambda shown: shown.item == MARKUP)
    status, headers, body = http(f"{link}api/items/{position}")
    assert status == 200 and headers["content-type"] == "application/json"
    item = json.loads(body)
    assert {item["response_1"], item["response_2"]} == {MARKUP.response_a, MARKUP.response_b}
    assert item["persona"] == list(MARKUP.persona) and item["history"][0]["text"] == MARKUP.history[0]
    status, headers, page = http(link)
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"<script src=\"page.js\" defer></script>" in page and b"bold" not in page  # no data in the page
    policy = headers["content-security-policy"]
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy and "default-src 'none'" in policy
    assert headers["x-content-type-options"] == "nosniff" and headers["referrer-policy"] == "no-referrer"


@pytest.mark.parametrize("request_kwargs, status, error", [
    ({"body": {"choice": "3"}}, 400, 'expected {"choice": "1" | "2" | "draw"}'),
    ({"body": {"choice": "1", "extra": 1}}, 400, 'expected {"choice"'),
    ({"body": ["1"]}, 400, 'expected {"choice"'),
    ({"raw": b"{not json"}, 400, "not valid JSON"),
    ({"raw": b"\xff\xfe"}, 400, "not valid JSON"),
    ({"body": {"choice": "1"}, "content_type": "text/plain"}, 415, "send the vote as JSON"),
    ({"raw": b'{"choice": "1"}' + b" " * 5000}, 413, None),
    ({"body": {"choice": "1"}, "path": "api/items/0/vote"}, 404, "no item at position 0"),
    ({"body": {"choice": "1"}, "path": "api/items/6/vote"}, 404, "no item at position 6"),
    ({"body": {"choice": "1"}, "path": "api/items/99999999999999999999999/vote"}, 404, "no item at position"),
    ({"path": "api/items/1/vote"}, 405, None),
    ({"path": "api/items/one"}, 404, None),
    ({"path": "api/nothing"}, 404, None),
])
def test_bad_requests_get_a_clear_4xx_and_no_traceback(served, request_kwargs, status, error):
    study, base, tokens = served
    before = len(study.votes(history=True))
    kwargs = dict(request_kwargs)
    path = kwargs.pop("path", "api/items/1/vote")
    got, _, body = http(link_of(base, tokens["alice"]) + path, **kwargs)
    assert got == status, body
    assert b"Traceback" not in body and b"File \"" not in body
    if error is not None:
        assert error in json.loads(body)["error"]
    assert len(study.votes(history=True)) == before


def test_twenty_annotators_voting_at_once_store_every_vote_exactly_once(tmp_path):
    items, annotators = 6, 20
    study = Study.create(tmp_path / "study.db", pair_items(items))
    tokens = [study.add_annotator(f"annotator-{k:02d}") for k in range(annotators)]
    start = threading.Barrier(annotators, timeout=30)

    def choice(k: int, position: int) -> str:
        return CHOICES[(k + position) % 3]

    def annotate(k: int) -> list[dict]:
        link = link_of(base, tokens[k])
        start.wait()  # every annotator starts at once
        return [vote(link, position, choice(k, position)) for position in range(1, items + 1)]

    with server_in_thread(study) as base:
        with concurrent.futures.ThreadPoolExecutor(max_workers=annotators) as pool:
            answers = list(pool.map(annotate, range(annotators), timeout=120))
    assert [[a["done"] for a in answers[k]] for k in range(annotators)] == [list(range(1, items + 1))] * annotators
    history = study.votes(history=True)
    assert len(history) == annotators * items and all(v.current for v in history)
    stored = {(v.annotator, v.item): v.winner for v in history}
    assert len(stored) == annotators * items
    for k, token in enumerate(tokens):
        annotator = study.annotator_for_token(token)
        for position in range(1, items + 1):
            shown = study.shown_item(annotator, position)
            assert stored[(annotator.name, shown.number)] == shown.winner(choice(k, position))


@pytest.mark.usefixtures("subprocess_env")
def test_votes_the_server_acknowledged_survive_sigkill(tmp_path):
    study = Study.create(tmp_path / "study.db", pair_items(5))
    token = study.add_annotator("alice")
    with ServerProcess(study.path) as server:
        link = link_of(server.url, token)
        acknowledged = {position: vote(link, position, choice)["choice"]
                        for position, choice in ((1, "1"), (2, "draw"), (3, "2"))}
        server.kill()  # between votes, with no chance to shut down cleanly
    with ServerProcess(study.path) as server:
        link = link_of(server.url, token)
        state = get_json(f"{link}api/state")
        assert (state["done"], state["next"]) == (3, 4)  # resumes where it stopped
        assert {p: get_json(f"{link}api/items/{p}")["choice"] for p in (1, 2, 3)} == acknowledged
        vote(link, 4, "1")
        vote(link, 5, "1")
    assert len(study.votes(history=True)) == 5
