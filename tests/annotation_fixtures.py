"""Shared pieces of the human-study tests: small studies, judge output folders written by hand, a
study server in a thread or in its own process (`pdpo annotate serve`), and HTTP calls over
127.0.0.1 with timeouts."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator

from pdpo_jax.annotation.server import base_url, bind, make_server
from pdpo_jax.annotation.store import ShownItem, Study
from pdpo_jax.evaluate.judge_pairs import PairItem

REPO_ROOT = Path(__file__).resolve().parents[1]
HTTP_TIMEOUT_S = 10.0
SERVER_START_TIMEOUT_S = 60.0  # a loaded 2-core machine imports the package slowly
ANNOUNCED = re.compile(r"at (http://127\.0\.0\.1:\d+)/ ")

# (persona, history, a response in character, one that contradicts the persona)
DIALOGUES = [
    (("i have two cats.", "i work as a teacher.", "i love hiking on weekends."),
     ("hi! how was your weekend?", "great, i spent it outside. and yours?", "quiet. what do you do for fun?"),
     "i go hiking whenever i can, and my cats wait for me at home.", "i mostly stay in, i have never liked the outdoors."),
    (("i am a vegan.", "i play the guitar in a band.", "my favorite season is winter."),
     ("hello there!", "hi! what are you up to tonight?"),
     "band practice, then a vegan curry at home.", "grilling steaks with my brother, like every friday."),
    (("i grew up on a farm.", "i drive a red truck.", "i am afraid of heights."),
     ("do you want to go rock climbing with us?",),
     "i would rather not, heights scare me. could we go fishing instead?", "sure, i climb every week, the higher the better."),
]


# Markup in every text of an item: the page must show it as text and never run it.
MARKUP = PairItem(id="markup#1", persona=("i like <b>bold</b> claims.",), history=("<i>hi</i> there",),
                  model_a="PseudoDPO", response_a="<script>window.pwned = 1</script> hello",
                  model_b="SFT", response_b='<img src=x onerror="window.pwned = 2"> hi')


def pair_items(count: int, model_a: str = "PseudoDPO", model_b: str = "SFT") -> list[PairItem]:
    """`count` items with readable dialogues; model A answers in character, model B does not."""
    items = []
    for i in range(count):
        persona, history, in_character, out_of_character = DIALOGUES[i % len(DIALOGUES)]
        items.append(PairItem(id=f"dialogue-{i}#{len(history)}", persona=persona, history=history,
                              model_a=model_a, response_a=in_character, model_b=model_b, response_b=out_of_character))
    return items


def write_responses_file(path: Path, model: str, items: list[PairItem], side: str) -> Path:
    """The responses of one side of `items` as a `pdpo judge --responses` file."""
    rows = [{"id": item.id, "persona": list(item.persona), "history": list(item.history),
             "response": getattr(item, f"response_{side}"), "model": model} for item in items]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_judge_output(folder: Path, items: list[PairItem], outcomes: list[str | None],
                       swapped: frozenset[int] = frozenset()) -> Path:
    """A judge output folder as `pdpo judge` writes it, judging item i with outcomes[i] (from its
    model A's side); the judge holds the items in `swapped` with A and B the other way round."""
    folder.mkdir(parents=True, exist_ok=True)
    model_a, model_b = items[0].model_a, items[0].model_b
    files = {model_a: write_responses_file(folder / "a.jsonl", model_a, items, "a"),
             model_b: write_responses_file(folder / "b.jsonl", model_b, items, "b")}
    flip = {"win": "lose", "lose": "win", "draw": "draw", None: None}
    rows = []
    for i, (item, outcome) in enumerate(zip(items, outcomes)):
        a, b, said = (item.model_b, item.model_a, flip[outcome]) if i in swapped else (item.model_a, item.model_b, outcome)
        rows.append({"id": item.id, "model_a": a, "model_b": b, "status": "ok" if outcome else "unparsable",
                     "outcome": said, "position_consistent": True, "orders": []})
    (folder / "judgments.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    results = {"mode": "pairwise", "responses": [{"model": m, "path": str(p)} for m, p in files.items()]}
    (folder / "judge_results.json").write_text(json.dumps(results), encoding="utf-8")
    return folder


def position_of(study: Study, token: str, wanted: Callable[[ShownItem], bool]) -> int:
    """The first position of the token's annotator whose item is `wanted`."""
    annotator = study.annotator_for_token(token)
    total = study.progress(annotator).total
    return next(p for p in range(1, total + 1) if wanted(study.shown_item(annotator, p)))


# ------------------------------------------------------------------------------------------ HTTP


def http(url: str, *, body: Any = None, raw: bytes | None = None, content_type: str = "application/json",
         method: str | None = None) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request; a 4xx/5xx is returned, not raised."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    headers = {"Content-Type": content_type} if data is not None else {}
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def get_json(url: str) -> Any:
    status, _, body = http(url)
    assert status == 200, (url, status, body)
    return json.loads(body)


def vote(link: str, position: int, choice: str) -> dict[str, Any]:
    status, _, body = http(f"{link}api/items/{position}/vote", body={"choice": choice})
    assert status == 200, (position, choice, status, body)
    return json.loads(body)


def link_of(base: str, token: str) -> str:
    return f"{base}/a/{token}/"


# ------------------------------------------------------------------------------------------ servers


@contextlib.contextmanager
def server_in_thread(study: Study) -> Iterator[str]:
    """The study served on a free port of 127.0.0.1 by a thread of this process; yields its base URL."""
    sock = bind("127.0.0.1", 0)
    server = make_server(study)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the study server did not start"
        time.sleep(0.02)
    try:
        yield base_url(sock)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


class ServerProcess:
    """`pdpo annotate serve --db DB --port 0` in its own process; `url` is read from its first line."""

    def __init__(self, db: Path):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               "JAX_PLATFORMS": "cpu"}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pdpo_jax.cli", "annotate", "serve", "--db", str(db), "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT)
        self.url = self._read_url()

    def _read_url(self) -> str:
        lines: list[str] = []
        found = threading.Event()

        def read() -> None:
            for line in self.process.stdout:
                lines.append(line)
                if ANNOUNCED.search(line):
                    found.set()
                    return

        threading.Thread(target=read, daemon=True).start()
        if not found.wait(SERVER_START_TIMEOUT_S):
            self.kill()
            raise AssertionError(f"`pdpo annotate serve` did not announce its address: {''.join(lines)}")
        return ANNOUNCED.search(lines[-1]).group(1)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, as in a crash."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process.stdout.close()

    def __enter__(self) -> "ServerProcess":
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()
