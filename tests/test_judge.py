"""The pairwise LLM judge against a scripted OpenAI-compatible server on 127.0.0.1: judging, the
statistics, the settings and their config section, and the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest

from pdpo_jax.config import ConfigError, JudgeSection, load_config
from pdpo_jax.errors import RunFailed, UsageError
from pdpo_jax.evaluate import judge_client, judge_pairs, judge_prompts, judge_stats
from pdpo_jax.stages import judge as judge_stage
from pdpo_jax.evaluate.judge_client import JudgeConfigError
from pdpo_jax.evaluate.judge_evaluation import JudgeSettings, run_judge, settings_from_section
from judge_fixtures import Reply, ScriptedJudgeServer, write_responses

KEY_ENV = "PDPO_TEST_JUDGE_KEY"
KEY = "sk-test-DISTINCTIVE-9f3c1a7e55b2"
PERSONA = ["i have two cats.", "i work as a teacher."]


@pytest.fixture(autouse=True)
def _fake_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)


def dialogue_rows(model: str, n: int) -> list[dict]:
    return [
        {
            "id": str(i),
            "persona": PERSONA,
            "history": [f"dialogue-{i}: hi, how are you?", "great, just got home.", "what do you do for work?"],
            "response": f"{model} says answer {i}",
        }
        for i in range(n)
    ]


def seen(body: dict) -> tuple[int, list[str]]:
    """The dialogue id and the models in presentation order, read from the judge's user message."""
    user = body["messages"][1]["content"]
    example = int(re.search(r"dialogue-(\d+)", user).group(1))
    order = [m.group(1) for m in re.finditer(r"(\w+) says answer", user)]
    return example, order


def verdict(text: str, v: int) -> Reply:
    return Reply(text=f"{text}\nVerdict: [[{v}]]")


# Pairwise scenario, A = alpha, B = beta. Expected combined outcome per id in the comment.
SCRIPT = {
    0: "alpha", 1: "alpha", 2: "alpha",  # win
    3: "beta", 4: "beta",  # lose
    5: "tie",  # draw
    6: "position1",  # [[1]] in both orders: win + lose -> draw (inconsistent)
    7: "alpha_first_else_tie",  # win + tie -> win (inconsistent, half)
    8: "malformed_once",  # no verdict, then asked again -> alpha wins
    9: "malformed_always",  # unparsable
    10: "rate_limited_twice",  # 429 twice per order, then beta wins -> lose
    11: "always_500",  # failed after the retries
    12: "slow_once",  # first attempt exceeds the client timeout, then alpha wins -> win
}
N_PAIRWISE = len(SCRIPT)
MAX_RETRIES = 2
# Generous, so a loaded machine never times out an ordinary reply; the scripted slow reply
# outlasts it by far and is cut short when the server stops.
TIMEOUT_S = 2.0


def pairwise_policy(body: dict, attempt: int) -> Reply:
    example, order = seen(body)
    behaviour = SCRIPT.get(example, "alpha")
    reasked = len(body["messages"]) > 2
    if behaviour == "always_500":
        return Reply(status=500)
    if behaviour == "rate_limited_twice" and attempt < 2:
        return Reply(status=429, headers={"Retry-After": "0", "retry-after-ms": "20"})
    if behaviour == "slow_once" and attempt == 0:
        return Reply(delay_s=60.0, text="too late [[1]]")
    if behaviour == "malformed_always" or (behaviour == "malformed_once" and not reasked):
        return Reply(text="Both responses are fine, I think response 1 is [1] maybe.")
    if behaviour == "position1":
        return verdict("The first one reads better.", 1)
    if behaviour == "tie":
        return verdict("Equally good.", 3)
    if behaviour == "alpha_first_else_tie":
        return verdict("Hmm.", 1 if order[0] == "alpha" else 3)
    preferred = "beta" if behaviour in ("beta", "rate_limited_twice") else "alpha"
    return verdict(f"{preferred} keeps the persona.", 1 if order[0] == preferred else 2)


def alpha_wins(body: dict, attempt: int) -> Reply:
    _, order = seen(body)
    return verdict("alpha keeps the persona.", 1 if order[0] == "alpha" else 2)


def argv_for(server: ScriptedJudgeServer, files: list[str], out: Path, *extra: str, plots: bool = False) -> list[str]:
    return [
        *([] if plots else ["--no-plots"]),
        "--responses", *files,
        "--base-url", server.base_url,
        "--judge-model", "judge-test",
        "--api-key-env", KEY_ENV,
        "--timeout", str(TIMEOUT_S),
        "--max-retries", str(MAX_RETRIES),
        "--backoff-base", "0.001",
        "--backoff-max", "0.05",
        "--bootstrap", "200",
        "--out", str(out),
        *extra,
    ]


def settings_for(server: ScriptedJudgeServer, **changes) -> JudgeSettings:
    """The settings `argv_for` spells as flags, with `changes` on top."""
    fast = dict(
        model="judge-test",
        base_url=server.base_url,
        api_key_env=KEY_ENV,
        timeout=TIMEOUT_S,
        max_retries=MAX_RETRIES,
        backoff_base=0.001,
        backoff_max=0.05,
        bootstrap=200,
        plots=False,
    )
    return JudgeSettings(**{**fast, **changes})


def judge_files(server: ScriptedJudgeServer, files: list[str], out: Path, **changes) -> tuple[dict, list, list[float]]:
    delays: list[float] = []
    results, judgments = run_judge(files, out, settings_for(server, **changes), sleep=delays.append)
    return results, judgments, delays


def files_under(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if p.is_file()]


# --------------------------------------------------------------------------------------------
# Against the scripted server


def test_pairwise_counts_retries_cache_and_key_safety(tmp_path):
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", N_PAIRWISE))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", N_PAIRWISE))
    out, cache = tmp_path / "out", tmp_path / "cache" / "judge.jsonl"
    with ScriptedJudgeServer(pairwise_policy) as server:
        changes = dict(cache=str(cache), concurrency=4, plots=True)
        results, judgments, delays = judge_files(server, [a, b], out, **changes)

        assert results["counts"] == {"win": 6, "draw": 2, "lose": 3}
        assert results["status"] == {"requested": 13, "judged": 11, "unparsable": 1, "failed": 1, "reasked_orders": 4}
        assert results["position_consistency"]["pairs"] == 11
        assert results["position_consistency"]["consistent"] == 9
        by_id = {j.item.id: j for j in judgments}
        assert by_id["6"].outcome == "draw" and by_id["6"].consistent is False
        assert by_id["7"].outcome == "win" and by_id["7"].consistent is False
        assert by_id["9"].status == "unparsable" and by_id["11"].status == "failed"
        assert "gave up after 3 attempts" in by_id["11"].orders[0].error
        assert "HTTP 500" in by_id["11"].orders[0].error and "Bearer ***" in by_id["11"].orders[0].error

        # Requests: 2 per plain pair (ids 0-7), 2 per order for re-asked ones (8, 9), 3 per order
        # for the twice rate-limited (10), 1 + MAX_RETRIES per order for the always-500 (11), 2
        # per order for the timed-out-once (12).
        expected = 8 * 2 + 2 * 2 + 2 * 2 + 2 * 3 + 2 * (1 + MAX_RETRIES) + 2 * 2
        assert server.request_count == expected == results["requests_sent"]
        # Retry-After (as retry-after-ms) is honoured for the 429s; every wait stays under the cap.
        assert sum(d >= 0.02 for d in delays) == 4
        assert all(d <= 0.05 for d in delays)
        assert len(delays) == 4 + 2 * MAX_RETRIES + 2  # 429s, 500s, timeouts
        assert set(server.authorizations) == {f"Bearer {KEY}"}

        # Rerun on the same cache: only the failed pair is asked again.
        before = server.request_count
        rerun, _, _ = judge_files(server, [a, b], out, **changes)
        assert server.request_count - before == 2 * (1 + MAX_RETRIES)
        assert rerun["counts"] == results["counts"]

    written = files_under(out, cache.parent)
    assert {p.name for p in written} >= {"judge_results.json", "judge_results.md", "judgments.jsonl", "win_rates.png", "outcomes.png", "judge.jsonl"}
    for path in written:
        assert KEY.encode() not in path.read_bytes(), path
    saved = json.loads((out / "judge_results.json").read_text())
    assert saved["counts"] == {"win": 6, "draw": 2, "lose": 3}
    assert saved["judge"]["api_key_env"] == KEY_ENV
    rows = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
    assert [r["outcome"] for r in rows if r["id"] in ("0", "3", "5")] == ["win", "lose", "draw"]


def test_cache_rerun_is_free_and_survives_a_torn_line(tmp_path):
    n = 6
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", n))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", n))
    cache = tmp_path / "judge_cache.jsonl"
    with ScriptedJudgeServer(pairwise_policy) as server:
        first, _, _ = judge_files(server, [a, b], tmp_path / "one", cache=str(cache))
        assert server.request_count == 2 * n

        judge_files(server, [a, b], tmp_path / "two", cache=str(cache))
        assert server.request_count == 2 * n  # everything came from the cache

        with open(cache, "ab") as handle:  # a write interrupted half-way
            handle.write(b'{"key": "0123abc", "model": "judge-test", "te')
        again, _, _ = judge_files(server, [a, b], tmp_path / "three", cache=str(cache))
        assert server.request_count == 2 * n
        assert again["counts"] == first["counts"]
        assert again["cache"]["torn_lines_dropped"] == 1

        # New prompts (Japanese) append cleanly after the cut: every line parses afterwards.
        ja, _, _ = judge_files(server, [a, b], tmp_path / "four", cache=str(cache), language="ja")
        assert server.request_count == 4 * n
        assert ja["counts"] == first["counts"]
    lines = cache.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert len([json.loads(line) for line in lines[:-1]]) == 4 * n
    assert judge_client.JudgmentCache(cache).torn_lines_dropped == 0


def test_concurrency_bound_is_respected(tmp_path):
    n = 10
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", n))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", n))
    with ScriptedJudgeServer(alpha_wins, hold_until_in_flight=3) as server:
        results, _, _ = judge_files(server, [a, b], tmp_path / "out", concurrency=3, timeout=10.0)
        assert server.max_in_flight == 3
    assert results["counts"] == {"win": n, "draw": 0, "lose": 0}


def test_single_order_judges_each_pair_once_in_a_seeded_order(tmp_path):
    n = 12
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", n))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", n))
    always_first = lambda body, attempt: verdict("first", 1)  # noqa: E731 - a judge with pure position bias
    with ScriptedJudgeServer(always_first) as server:
        results, judgments, _ = judge_files(server, [a, b], tmp_path / "out", orders="single", seed=3)
        assert server.request_count == n
    a_first = [j.orders[0].a_first for j in judgments]
    assert a_first == [order[0] for order in judge_pairs.presentation_orders(n, "single", 3)]
    assert 0 < sum(a_first) < n  # both orders occur, so position bias does not favour one model
    assert results["counts"]["win"] == sum(a_first) and results["counts"]["lose"] == n - sum(a_first)
    assert results["position_consistency"]["rate"] is None
    assert results["position_consistency"]["first_position_win_rate"] == 1.0


def test_main_writes_outputs_and_reports_success(tmp_path, capsys):
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", 4))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", 4)[:3])  # id 3 unmatched
    out = tmp_path / "out"
    with ScriptedJudgeServer(alpha_wins) as server:
        assert judge_stage.main(argv_for(server, [a, b], out)) == 0
    printed = capsys.readouterr().out
    assert "| alpha | beta | 100.0 (3) | 0.0 (0) | 0.0 (0) |" in printed
    saved = json.loads((out / "judge_results.json").read_text())
    assert saved["unmatched_ids"] == {"alpha": 1, "beta": 0}
    assert not (out / "win_rates.png").exists()


def test_main_fails_clearly_without_the_key(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", 2))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", 2))
    argv = ["--responses", a, b, "--judge-model", "m", "--api-key-env", KEY_ENV, "--out", str(tmp_path / "o")]
    with pytest.raises(JudgeConfigError) as error:  # raised, not printed: the caller reports it
        judge_stage.main(argv)
    assert KEY_ENV in str(error.value)


def test_help_describes_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        judge_stage.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--responses", "--mode", "--base-url", "--judge-model", "--api-key-env", "--language",
                   "--orders", "--concurrency", "--max-retries", "--cache", "--games", "--seed", "--out",
                   "--config", "KEY=VALUE", "judge.model"):
        assert option in text


# --------------------------------------------------------------------------------------------
# Tournament

STRENGTH = {"alpha": 3, "beta": 2, "gamma": 1, "delta": 0}


def tournament_policy(body: dict, attempt: int) -> Reply:
    example, order = seen(body)
    if example % 4 == 0:
        return verdict("Both fine.", 3)
    if example % 4 == 1:  # an upset: the weaker model wins these dialogues
        better = min(order, key=STRENGTH.get)
    else:
        better = max(order, key=STRENGTH.get)
    return verdict("ok", 1 if order[0] == better else 2)


def expected_outcome(example: int, a: str, b: str) -> str:
    if example % 4 == 0:
        return "draw"
    a_stronger = STRENGTH[a] > STRENGTH[b]
    return "win" if a_stronger != (example % 4 == 1) else "lose"


def test_tournament_is_seeded_and_win_rates_match_the_games(tmp_path):
    n = 20
    files = [write_responses(tmp_path / f"{m}.jsonl", m, dialogue_rows(m, n)) for m in STRENGTH]
    with ScriptedJudgeServer(tournament_policy) as server:
        runs = {}
        for name, seed in (("s1", 1), ("s1_again", 1), ("s2", 2)):
            out = tmp_path / name
            results, _, _ = judge_files(server, files, out, mode="tournament", games=30, seed=seed)
            games = [json.loads(line) for line in (out / "judgments.jsonl").read_text().splitlines()]
            results.pop("requests_sent"), results.pop("cache")  # run-specific, not part of the outcome
            runs[name] = (results, games)

    results, games = runs["s1"]
    assert runs["s1_again"] == runs["s1"]
    assert [(g["id"], g["model_a"], g["model_b"]) for g in runs["s2"][1]] != [(g["id"], g["model_a"], g["model_b"]) for g in games]
    assert len({(g["id"], frozenset((g["model_a"], g["model_b"]))) for g in games}) == 30

    tally = {m: [0.0, 0] for m in STRENGTH}
    for g in games:
        outcome = expected_outcome(int(g["id"]), g["model_a"], g["model_b"])
        assert g["outcome"] == outcome
        score = {"win": 1.0, "draw": 0.5, "lose": 0.0}[outcome]
        tally[g["model_a"]][0] += score
        tally[g["model_b"]][0] += 1.0 - score
        tally[g["model_a"]][1] += 1
        tally[g["model_b"]][1] += 1
    for row in results["models"]:
        points, played = tally[row["model"]]
        assert row["games"] == played
        assert row["win_rate"] == pytest.approx(points / played)
        assert row["ci_low"] <= row["win_rate"] <= row["ci_high"]
        assert row["wins"] + row["draws"] + row["losses"] == played
    h2h = results["head_to_head"]
    for a in STRENGTH:
        for b in STRENGTH:
            if a != b:
                assert h2h[a][b]["win"] == h2h[b][a]["lose"] and h2h[a][b]["draw"] == h2h[b][a]["draw"]
    md = (tmp_path / "s1" / "judge_results.md").read_text()
    for row in results["models"]:
        assert f"| {row['model']} | {row['games']} | {row['wins']} | {row['draws']} | {row['losses']} | {100 * row['win_rate']:.1f} |" in md


def test_tournament_default_games_cap_at_every_combination(tmp_path):
    files = [write_responses(tmp_path / f"{m}.jsonl", m, dialogue_rows(m, 2)) for m in ("alpha", "beta", "gamma")]
    with ScriptedJudgeServer(tournament_policy) as server:
        results, judgments, _ = judge_files(server, files, tmp_path / "out", mode="tournament")
    assert results["games_requested"] == len(judgments) == 2 * 3  # 2 dialogues x 3 model pairs
    assert sum(r["games"] for r in results["models"]) == 2 * len(judgments)


# --------------------------------------------------------------------------------------------
# Settings, the config's judge section, and the command line


@pytest.mark.parametrize(
    "change, fragment",
    [
        ({"model": None}, "model: no judge model given"),
        ({"model": " "}, "model: no judge model given"),
        ({"base_url": ""}, "base_url must be a URL"),
        ({"language": "fr"}, r"language must be one of \['en', 'ja'\]"),
        ({"orders": "twice"}, "orders must be one of"),
        ({"mode": "league"}, "mode must be one of"),
        ({"temperature": -0.1}, "temperature must be a number >= 0"),
        ({"temperature": float("nan")}, "temperature must be a number >= 0"),
        ({"max_tokens": 0}, "max_tokens must be an integer >= 1"),
        ({"timeout": 0}, "timeout must be a number > 0"),
        ({"concurrency": 0}, "concurrency must be an integer >= 1"),
        ({"concurrency": True}, "concurrency must be an integer >= 1"),
        ({"concurrency": 2.5}, "concurrency must be an integer >= 1"),
        ({"max_retries": -1}, "max_retries must be an integer >= 0"),
        ({"backoff_base": 0.0}, "backoff_base must be a number > 0"),
        ({"backoff_max": -1.0}, "backoff_max must be a number > 0"),
        ({"cache": 3}, "cache must be a path or None"),
        ({"games": 0}, "games must be an integer >= 1 or None"),
        ({"limit": 0}, "limit must be an integer >= 1 or None"),
        ({"bootstrap": 0}, "bootstrap must be an integer >= 1"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"plots": "yes"}, "plots must be true or false"),
    ],
)
def test_settings_refuse_bad_values_naming_the_field(change, fragment):
    with pytest.raises(JudgeConfigError, match=fragment):
        JudgeSettings(**{"model": "m", **change})


def test_settings_never_echo_a_key_pasted_into_api_key_env():
    for value in (KEY, "", "MY VAR"):
        with pytest.raises(JudgeConfigError, match="api_key_env must be the name of an environment variable") as error:
            JudgeSettings(model="m", api_key_env=value)
        assert KEY not in str(error.value)


def test_settings_mirror_the_config_section():
    # judge.serve is the stage's own: which model it serves itself, not a setting of the judge client.
    section_fields = {f.name: f.default for f in dataclasses.fields(JudgeSection) if f.name != "serve"}
    settings_fields = {f.name: f.default for f in dataclasses.fields(JudgeSettings)}
    assert list(section_fields) == list(settings_fields)
    assert {**section_fields, "model": None} == {**settings_fields, "model": None}
    assert not [name for name in section_fields if "key" in name and name != "api_key_env"]  # no field for the key itself
    assert settings_from_section(JudgeSection(model="m")) == JudgeSettings(model="m")
    section = JudgeSection(model="m", concurrency=2, orders="single")
    assert settings_from_section(section, concurrency=5) == JudgeSettings(model="m", concurrency=5, orders="single")
    with pytest.raises(JudgeConfigError, match="unknown judge setting 'concurency'"):
        settings_from_section(section, concurency=5)
    with pytest.raises(JudgeConfigError, match="judge.model"):
        settings_from_section(JudgeSection())


def test_config_judge_section_takes_overrides_and_refuses_unknown_keys(tmp_path):
    config = load_config(None, ["judge.model=gpt-4o", "judge.base_url=http://localhost:8000/v1", "judge.games=50"])
    assert (config.judge.model, config.judge.base_url, config.judge.games) == ("gpt-4o", "http://localhost:8000/v1", 50)
    assert config.judge.api_key_env == "OPENAI_API_KEY" and config.judge.orders == "both"
    assert load_config(None).judge == JudgeSection()
    with pytest.raises(ConfigError, match="unknown key 'judge.modle'"):
        load_config(None, ["judge.modle=gpt-4o"])
    with pytest.raises(ConfigError, match="unknown key 'judge.api_key'"):
        load_config(None, [f"judge.api_key={KEY}"])
    with pytest.raises(ConfigError, match="judge.orders must be one of"):
        load_config(None, ["judge.orders=thrice"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("judge:\n  modle: gpt-4o\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*unknown key 'judge.modle'"):
        load_config(bad)


def test_every_flag_sets_its_setting(tmp_path):
    argv = [
        "--responses", "a.jsonl", "b.jsonl", "--out", "o",
        "--mode", "tournament", "--judge-model", "jm", "--base-url", "http://h/v1", "--api-key-env", "VAR_1",
        "--language", "ja", "--orders", "single", "--temperature", "0.5", "--max-tokens", "7", "--timeout", "3",
        "--concurrency", "2", "--max-retries", "1", "--backoff-base", "0.5", "--backoff-max", "4",
        "--cache", "c.jsonl", "--games", "9", "--limit", "4", "--bootstrap", "11", "--seed", "5", "--no-plots",
    ]
    args = judge_stage.build_parser().parse_args(argv)
    expected = JudgeSettings(
        model="jm", base_url="http://h/v1", api_key_env="VAR_1", language="ja", orders="single", temperature=0.5,
        max_tokens=7, timeout=3.0, concurrency=2, max_retries=1, backoff_base=0.5, backoff_max=4.0, cache="c.jsonl",
        games=9, limit=4, bootstrap=11, seed=5, mode="tournament", plots=False,
    )
    assert judge_stage.settings_from_args(args, []) == expected
    # A flag not given leaves the config's value; one given replaces it.
    config = tmp_path / "judge.yaml"
    config.write_text("judge:\n  model: from-config\n  seed: 8\n  plots: false\n")
    args = judge_stage.build_parser().parse_args(["--config", str(config), "--responses", "a", "--out", "o", "--seed", "2"])
    assert judge_stage.settings_from_args(args, []) == JudgeSettings(model="from-config", seed=2, plots=False)


def test_overrides_written_after_the_responses_files_stay_overrides(tmp_path):
    existing = tmp_path / "x=1.jsonl"
    existing.write_text("")
    args = judge_stage.build_parser().parse_args(
        ["judge.seed=1", "--responses", "a.jsonl", str(existing), "judge.model=m", "--out", "o"]
    )
    files, overrides = judge_stage.split_overrides(args.responses, args.overrides)
    assert files == ["a.jsonl", str(existing)]
    assert overrides == ["judge.seed=1", "judge.model=m"]


def write_judge_config(path: Path, server: ScriptedJudgeServer, **keys) -> str:
    section = {
        "model": "judge-test", "base_url": server.base_url, "api_key_env": KEY_ENV, "timeout": TIMEOUT_S,
        "max_retries": MAX_RETRIES, "backoff_base": 0.001, "backoff_max": 0.05, "bootstrap": 200, "plots": False,
        **keys,
    }
    path.write_text(json.dumps({"judge": section}))  # JSON is YAML
    return str(path)


def test_main_runs_from_config_files_overrides_and_flags(tmp_path, capsys):
    n = 4
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", n))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", n))
    with ScriptedJudgeServer(alpha_wins) as server:
        base = write_judge_config(tmp_path / "base.yaml", server, orders="single", seed=5)
        later = tmp_path / "later.yaml"
        later.write_text("judge:\n  seed: 3\n")
        out = tmp_path / "one"
        argv = ["--config", base, "--config", str(later), "--responses", a, b, "--out", str(out), "judge.language=ja"]
        assert judge_stage.main(argv) == 0
        assert server.request_count == n  # single order, from the first file
        saved = json.loads((out / "judge_results.json").read_text())
        assert (saved["judge"]["model"], saved["orders"], saved["seed"], saved["language"]) == ("judge-test", "single", 3, "ja")
        assert saved["judge"]["base_url"] == server.base_url and saved["judge"]["api_key_env"] == KEY_ENV
        assert saved["counts"] == {"win": n, "draw": 0, "lose": 0}
        assert "| alpha | beta | 100.0 (4) | 0.0 (0) | 0.0 (0) |" in capsys.readouterr().out

        # Flags beat the config; an override after the files is still an override.
        out = tmp_path / "two"
        argv = ["--config", base, "--responses", a, b, "judge.seed=4", "--out", str(out), "--orders", "both",
                "--judge-model", "judge-other"]
        assert judge_stage.main(argv) == 0
        assert server.request_count == n + 2 * n
        assert {body["model"] for body in server.requests[n:]} == {"judge-other"}
        saved = json.loads((out / "judge_results.json").read_text())
        assert (saved["judge"]["model"], saved["orders"], saved["seed"]) == ("judge-other", "both", 4)
    for path in files_under(tmp_path / "one", tmp_path / "two"):
        assert KEY.encode() not in path.read_bytes(), path


def test_main_exits_1_when_judgments_failed(tmp_path, capsys):
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", 2))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", 2))
    with ScriptedJudgeServer(lambda body, attempt: Reply(status=500)) as server:
        config = write_judge_config(tmp_path / "judge.yaml", server)
        argv = ["--config", config, "judge.max_retries=0", "--responses", a, b, "--out", str(tmp_path / "out")]
        assert judge_stage.main(argv) == 1
        assert server.request_count == 2 * 2
    assert "pdpo judge: 2 judgments failed; rerun to retry them" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "judge_results.json").read_text())["status"]["failed"] == 2


def test_main_raises_setting_errors_before_any_request(tmp_path):
    a = write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", 2))
    b = write_responses(tmp_path / "b.jsonl", "beta", dialogue_rows("beta", 2))
    with ScriptedJudgeServer(alpha_wins) as server:
        config = write_judge_config(tmp_path / "judge.yaml", server)
        common = ["--config", config, "--responses", a, b, "--out", str(tmp_path / "out")]
        with pytest.raises(JudgeConfigError, match="concurrency must be an integer >= 1"):
            judge_stage.main([*common, "judge.concurrency=0"])
        with pytest.raises(JudgeConfigError, match="timeout must be a number > 0"):
            judge_stage.main([*common, "--timeout", "0"])
        with pytest.raises(ConfigError, match="unknown key 'judge.modle'"):
            judge_stage.main([*common, "judge.modle=x"])
        with pytest.raises(JudgeConfigError, match="mode 'pairwise' takes exactly two responses files, got 1"):
            judge_stage.main(["--config", config, "--responses", a, "--out", str(tmp_path / "out")])
        assert server.request_count == 0
    with pytest.raises(JudgeConfigError, match="no judge model given"):
        judge_stage.main(["--responses", a, b, "--out", str(tmp_path / "out")])


def write_run_responses(run: Path, n: int) -> None:
    """A run's test responses as `pdpo test-responses` writes them (PseudoDPO and SFT)."""
    folder = run / "test_responses"
    folder.mkdir(parents=True)
    write_responses(folder / "dpo.jsonl", "PseudoDPO", dialogue_rows("PseudoDPO", n))
    write_responses(folder / "sft.jsonl", "SFT", dialogue_rows("SFT", n))


def pseudo_dpo_wins(body: dict, attempt: int) -> Reply:
    _, order = seen(body)
    return verdict("PseudoDPO keeps the persona.", 1 if order[0] == "PseudoDPO" else 2)


def test_with_a_config_alone_judge_judges_the_runs_test_responses_once(tmp_path, capsys):
    run, n = tmp_path / "run", 3
    write_run_responses(run, n)
    with ScriptedJudgeServer(pseudo_dpo_wins) as server:
        config = write_judge_config(tmp_path / "run.yaml", server)
        assert judge_stage.main(["--config", config, f"run_dir={run}"]) == 0
        assert server.request_count == 2 * n
        saved = json.loads((run / "judge" / "judge_results.json").read_text())
        assert (saved["model_a"], saved["model_b"], saved["counts"]) == ("PseudoDPO", "SFT", {"win": n, "draw": 0, "lose": 0})
        assert json.loads((run / "judge" / "DONE").read_text())["counts"] == saved["counts"]
        assert "| PseudoDPO | SFT | 100.0 (3) |" in capsys.readouterr().out
        assert judge_stage.main(["--config", config, f"run_dir={run}"]) == 0  # finished: kept as it is
        assert server.request_count == 2 * n and "judge: already finished" in capsys.readouterr().out
        with pytest.raises(UsageError, match="--out goes with --responses"):
            judge_stage.main(["--config", config, f"run_dir={run}", "--out", str(tmp_path / "x")])
        with pytest.raises(ConfigError, match="test_responses/dpo.jsonl not found; run the test-responses stage first"):
            judge_stage.main(["--config", config, f"run_dir={tmp_path / 'empty'}"])
    with pytest.raises(UsageError, match="or --config FILE to judge a run's test responses"):
        judge_stage.main([])


def test_the_runs_judge_stage_says_in_one_line_that_it_is_skipped_without_a_judge_model(tmp_path, capsys):
    run = tmp_path / "run"
    write_run_responses(run, 2)
    plain = tmp_path / "plain.yaml"
    plain.write_text(f"run_dir: {run}\n")
    assert judge_stage.main(["--config", str(plain)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == [
        "judge: skipped, the config names no judge model (set judge.model, and judge.base_url for an endpoint "
        "other than the OpenAI API, or judge.serve to serve one here)"]
    assert not (run / "judge").exists()


def test_the_runs_judge_stage_stays_unfinished_while_judgments_fail(tmp_path):
    run, n = tmp_path / "run", 2
    write_run_responses(run, n)
    failing = {"on": True}

    def policy(body: dict, attempt: int) -> Reply:
        return Reply(status=500) if failing["on"] else pseudo_dpo_wins(body, attempt)

    with ScriptedJudgeServer(policy) as server:
        config = write_judge_config(tmp_path / "run.yaml", server, max_retries=0)
        with pytest.raises(RunFailed, match="judge: 2 judgments failed .*rerun the stage to retry them"):
            judge_stage.main(["--config", config, f"run_dir={run}"])
        assert not (run / "judge" / "DONE").exists()
        failing["on"] = False
        assert judge_stage.main(["--config", config, f"run_dir={run}"]) == 0
        assert (run / "judge" / "DONE").exists()


# --------------------------------------------------------------------------------------------
# Pure pieces


def test_parse_verdict_takes_the_last_verdict():
    assert judge_prompts.parse_verdict("Response [[1]] looked good at first, but overall [[2]]") == 2
    assert judge_prompts.parse_verdict("explanation...\n[[3]]") == 3
    assert judge_prompts.parse_verdict("全角でも［［１］］") == 1
    assert judge_prompts.parse_verdict("[[ 2 ]]") == 2
    assert judge_prompts.parse_verdict("no verdict [4] [[4]] [1]") is None
    assert judge_prompts.parse_verdict("") is None


def test_combine_orders_table():
    w, d, l = "win", "draw", "lose"
    table = {(w, w): w, (d, d): d, (l, l): l, (w, d): w, (d, w): w, (l, d): l, (d, l): l, (w, l): d, (l, w): d}
    for (first, second), combined in table.items():
        assert judge_prompts.combine_orders(first, second) == combined
    assert [judge_prompts.verdict_to_outcome(v, True) for v in (1, 2, 3)] == [w, l, d]
    assert [judge_prompts.verdict_to_outcome(v, False) for v in (1, 2, 3)] == [l, w, d]


def test_the_instructions_are_the_system_prompt_without_its_output_format():
    for prompt in judge_prompts.PROMPTS.values():
        assert prompt.system == f"{prompt.instructions}\n\n{prompt.output_format}"
        assert "[[" not in prompt.instructions and "[[1]]" in prompt.output_format
    # Cached answers are keyed on the system prompt: a changed text would silently miss them all.
    assert hashlib.sha256(judge_prompts.PROMPTS["en"].system.encode()).hexdigest().startswith("0962e7e8aec0c915")
    assert hashlib.sha256(judge_prompts.PROMPTS["ja"].system.encode()).hexdigest().startswith("4e0d9cedac172711")


def test_prompts_carry_the_format_and_the_bias_rules():
    for language in ("en", "ja"):
        prompt = judge_prompts.prompt_for(language)
        messages = judge_prompts.build_messages(prompt, PERSONA, ["hi", "hello", "what's up?"], "RESP-ONE", "RESP-TWO")
        system, user = messages[0]["content"], messages[1]["content"]
        assert all(v in system for v in ("[[1]]", "[[2]]", "[[3]]"))
        assert user.index("RESP-ONE") < user.index("RESP-TWO")
        assert all(p in user for p in PERSONA)
        lines = judge_prompts.format_history(["hi", "hello", "what's up?"], prompt).splitlines()
        assert lines[-1].startswith(prompt.partner_label) and lines[-2].startswith(prompt.speaker_label)
    assert "Position" in judge_prompts.PROMPTS["en"].system and "Length" in judge_prompts.PROMPTS["en"].system
    assert "位置" in judge_prompts.PROMPTS["ja"].system and "長さ" in judge_prompts.PROMPTS["ja"].system
    with pytest.raises(ValueError, match="unknown judge language"):
        judge_prompts.prompt_for("fr")


def test_cache_key_depends_on_model_messages_and_sampling():
    messages = [{"role": "user", "content": "x"}]
    base = judge_client.cache_key("m", messages, {"temperature": 0.0, "max_tokens": 10})
    assert base == judge_client.cache_key("m", list(messages), {"max_tokens": 10, "temperature": 0.0})
    assert base != judge_client.cache_key("m2", messages, {"temperature": 0.0, "max_tokens": 10})
    assert base != judge_client.cache_key("m", [{"role": "user", "content": "y"}], {"temperature": 0.0, "max_tokens": 10})
    assert base != judge_client.cache_key("m", messages, {"temperature": 0.7, "max_tokens": 10})


def test_cache_rejects_damage_before_the_last_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"key": "a", "text": "x"}\nnot json\n{"key": "b", "text": "y"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2"):
        judge_client.JudgmentCache(path)


def test_retry_delay_grows_is_capped_and_honours_retry_after():
    policy = judge_client.RetryPolicy(max_retries=5, backoff_base_s=1.0, backoff_max_s=8.0)
    rng = random.Random(0)
    for attempt in range(6):
        cap = min(8.0, 2.0**attempt)
        delay = policy.delay_s(attempt, None, rng)
        assert cap / 2 <= delay <= cap
    assert policy.delay_s(0, 5.0, rng) == 5.0
    assert policy.delay_s(0, 100.0, rng) == 8.0


def test_load_responses_names_file_line_and_key(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"id": 1, "persona": [], "history": [], "response": "x"}\n{"id": 2, "persona": [], "response": "y"}\n')
    with pytest.raises(JudgeConfigError, match=r"r.jsonl:2: missing key 'history'"):
        judge_pairs.load_responses(path)
    path.write_text('{"id": 1, "persona": [], "history": [], "response": "x"}\n{"id": "1", "persona": [], "history": [], "response": "y"}\n')
    with pytest.raises(JudgeConfigError, match="duplicate id '1'"):
        judge_pairs.load_responses(path)
    path.write_text('{"id": 1, "persona": [], "history": [], "response": "x"}\n')
    assert judge_pairs.load_responses(path).model == "r"


def test_common_ids_refuses_files_about_different_dialogues(tmp_path):
    a = judge_pairs.load_responses(write_responses(tmp_path / "a.jsonl", "alpha", dialogue_rows("alpha", 3)))
    rows = dialogue_rows("beta", 3)
    rows[1]["history"] = ["something else"]
    b = judge_pairs.load_responses(write_responses(tmp_path / "b.jsonl", "beta", rows))
    with pytest.raises(JudgeConfigError, match="id '1': history differs"):
        judge_pairs.common_ids([a, b])


def test_sample_games_are_distinct_seeded_and_bounded():
    ids, models = [str(i) for i in range(5)], ["a", "b", "c"]
    games = judge_stats.sample_games(ids, models, 15, seed=7)
    assert games == judge_stats.sample_games(ids, models, 15, seed=7)
    assert len({(i, frozenset((x, y))) for i, x, y in games}) == 15  # all 5 x 3 combinations
    assert all(x != y for _, x, y in games)
    with pytest.raises(JudgeConfigError, match="between 1 and 15"):
        judge_stats.sample_games(ids, models, 16, seed=7)


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_games():
    rng = np.random.default_rng(0)
    widths = []
    for n in (40, 400):
        score = rng.choice([0.0, 0.5, 1.0], size=n, p=[0.3, 0.2, 0.5])
        scores = np.stack([score, 1 - score], axis=1)
        low, high = judge_stats.bootstrap_win_rates(scores, np.ones_like(scores), samples=500, seed=1)
        assert low[0] <= score.mean() <= high[0]
        assert high[1] == pytest.approx(1 - low[0]) and low[1] == pytest.approx(1 - high[0])
        widths.append(high[0] - low[0])
    assert widths[1] < widths[0]
