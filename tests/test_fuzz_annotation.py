"""The annotation API over random requests: paths, tokens, methods, headers and bodies. Every request
gets a 2xx, a 4xx with a JSON error (a 403 "forbidden" for a token that is not an annotator's) or
nothing worse, quickly; no redirect but the relative one from a link without its final slash; only a valid vote by a valid token changes what is stored, and
no stored vote is ever lost (docs/bad-input.md, "Annotation API"). Driven in this process."""

from __future__ import annotations

import time
from urllib.parse import quote

import pytest
from annotation_fixtures import pair_items
from fuzz_fixtures import examples
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from pdpo_jax.annotation.server import MAX_BODY_BYTES, create_app
from pdpo_jax.annotation.store import CHOICES, Study

ITEMS = 4
SECONDS = 5.0
ANSWERED = {200, 307, 400, 403, 404, 405, 413, 415}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    study = Study.create(tmp_path_factory.mktemp("study") / "study.db", pair_items(ITEMS))
    tokens = {name: study.add_annotator(name) for name in ("alice", "bob")}
    client = TestClient(create_app(study), raise_server_exceptions=False)
    assert client.post(f"/a/{tokens['bob']}/api/items/1/vote", json={"choice": "draw"}).status_code == 200
    return study, tokens, client


tokens = st.one_of(st.sampled_from(["alice", "bob"]), st.text(max_size=70), st.sampled_from(
    ["", "..", "%2e%2e", "A" * 43, "a" * 65, "alice/../bob", "null", "*"]))
positions = st.one_of(st.integers(-3, ITEMS + 2), st.integers(), st.text(max_size=6))
suffixes = st.one_of(
    st.sampled_from(["", "/", "/page.js", "/page.css", "/api/state", "/api/state/", "/api/items", "/../x"]),
    positions.map(lambda p: f"/api/items/{p}"), positions.map(lambda p: f"/api/items/{p}/vote"),
    st.text(max_size=20).map(lambda t: "/" + t))
bodies = st.one_of(
    st.sampled_from(CHOICES).map(lambda c: f'{{"choice": "{c}"}}'.encode()),
    st.binary(max_size=2 * MAX_BODY_BYTES), st.just(b"[" * 600 + b"]" * 600),
    st.sampled_from([b"", b"{}", b'{"choice": 1}', b'{"choice": "1", "x": 2}', b"null", b'{"choice": "1"}' * 100]))
methods = st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"])
content_types = st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain",
                                 "application/x-www-form-urlencoded", "", "APPLICATION/JSON"])
hosts = st.sampled_from(["127.0.0.1:8000", "evil.example", "", "a" * 300])


@settings(max_examples=examples())
@given(token=tokens, suffix=suffixes, method=methods, body=bodies, content_type=content_types, host=hosts,
       prefix=st.sampled_from(["/a/", "/", "/a//", "/A/", "//a/"]))
def test_any_request_gets_a_clear_answer_and_changes_only_its_own_votes(study, token, suffix, method, body,
                                                                        content_type, host, prefix):
    study, known, client = study
    real = known.get(token, token)
    path = prefix + quote(real, safe="") + quote(suffix, safe="/%")
    before = study.votes(history=True)
    start = time.perf_counter()
    answer = client.request(method, path, content=body if method not in ("GET", "HEAD") else None,
                            headers={"content-type": content_type, "host": host}, follow_redirects=False)
    assert time.perf_counter() - start < SECONDS
    assert answer.status_code in ANSWERED, (path, answer.status_code, answer.text[:200])
    if answer.status_code == 307:  # /a/<token> -> <token>/, relative: nothing taken from the Host header
        assert answer.headers["location"] == f"{real}/" and token in known, answer.headers
    else:
        assert "location" not in answer.headers
    if method == "HEAD":  # a head answer has no body
        assert answer.content == b""
    elif answer.status_code == 403:
        assert answer.text == "forbidden"
    elif answer.status_code >= 400:
        assert "error" in answer.json() and "Traceback" not in answer.text

    after = study.votes(history=True)
    assert after[:len(before)] == before  # nothing stored is lost or changed
    new = after[len(before):]
    assert len(new) <= 1
    if new:
        assert token in known and method == "POST" and answer.status_code == 200
        assert new[0].annotator == token
