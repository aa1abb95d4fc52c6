"""DNLI evaluation: shared-prompt scores against naive full-sequence scoring in PyTorch
transformers, the report files, protocols, scoring modes, meshes and input errors.

Most tests use a tiny random Llama (or GPT-2) with a byte-level BPE tokenizer, which exercises the
mechanics (layout, masks, padding, offsets) but not the numbers; the tests named "bundled model"
run the bundled SmolLM2-135M-Instruct's tokenizer, chat template and first blocks
(`first_layers_model_path`) and skip without it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from data_fixtures import byte_bpe_tokenizer
from model_fixtures import load_torch_model, make_tiny_hf_model
from pdpo_jax.data import PromptEncoder, read_dnli
from pdpo_jax import cli
from pdpo_jax.evaluate import dnli
from pdpo_jax.stages import eval_dnli
from pdpo_jax.model import load_model

DEMO_DNLI = Path(dnli.__file__).resolve().parents[1] / "resources" / "demo" / "dnli_eval.jsonl"
HAS_BUNDLED_MODEL = importlib.util.find_spec("pdpo_jax.model.default_model") is not None
needs_bundled_model = pytest.mark.skipif(not HAS_BUNDLED_MODEL, reason="bundled model (pdpo_jax.model.default_model) not available")

# fp32 on CPU: summed log-probs of ~10-30 tokens agree to well under 1e-3 between XLA and PyTorch.
ATOL, RTOL = 2e-3, 1e-5


def _corpus() -> list[str]:
    texts = []
    for line in DEMO_DNLI.read_text().splitlines():
        record = json.loads(line)
        texts += record["persona"] + record["prefix"] + [t for group in record["candidates"].values() for t in group]
    return texts + ["Your persona:", "Partner: ", "You: ", "You are chatting with a partner."]


def _save_tiny(tmp_path_factory, family: str, **overrides) -> Path:
    tokenizer = byte_bpe_tokenizer(_corpus(), vocab_size=400)
    size = {"max_position_embeddings": 4096} if family != "gpt2" else {"n_positions": 4096}
    path = make_tiny_hf_model(tmp_path_factory.mktemp(family), family, vocab_size=len(tokenizer), **size, **overrides)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory, "llama")


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    return _save_tiny(tmp_path_factory, "gpt2")


def naive_torch_logps(model_dir: Path | str, tokenizer, template: str, examples, end_of_turn: bool = True) -> list[np.ndarray]:
    """Each candidate alone: forward over prompt + candidate, log-softmax, sum of the candidate's token log-probs."""
    import torch

    model = load_torch_model(model_dir)
    encoder = PromptEncoder(tokenizer, template)
    out = []
    for example in examples:
        prompt = encoder.prompt_ids(example.persona, example.history)
        scores = []
        for text, _ in example.candidates:
            candidate = encoder.response_ids(text, end_of_turn=end_of_turn)
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + candidate])).logits[0].double()
            logps = torch.log_softmax(logits, dim=-1)
            scores.append(sum(float(logps[len(prompt) - 1 + i, token]) for i, token in enumerate(candidate)))
        out.append(np.array(scores))
    return out


def _evaluate(model, data, **settings):
    """`model`: a directory, "default", or an already loaded model."""
    model = load_model(model) if isinstance(model, (str, Path)) else model
    return dnli.evaluate_dnli(model, data, dnli.DnliSettings(**settings))


def _assert_matches_naive(records, reference, scoring="sum"):
    assert len(records) == len(reference)
    for record, naive in zip(records, reference):
        ours = np.array(record["logps"])
        np.testing.assert_allclose(ours, naive, atol=ATOL, rtol=RTOL, err_msg=record["id"])
        naive_scores = naive if scoring == "sum" else naive / np.array(record["token_counts"])
        top = int(np.argmax(naive_scores))
        runner_up = np.sort(naive_scores)[-2]
        if naive_scores[top] - runner_up > 2 * ATOL:  # a near tie may go either way within the tolerance
            assert record["predicted_index"] == top, record["id"]


# --------------------------------------------------------------------------------------------
# (b) the same scores and argmax as naive full-sequence scoring


@pytest.mark.parametrize(
    "family, template, end_of_turn",
    [("llama", "chat-en", True), ("llama", "plain-en", False), ("gpt2", "plain-en", True)],
)
def test_scores_match_naive_full_sequence_scoring(request, family, template, end_of_turn):
    model_dir = request.getfixturevalue(f"tiny_{family}")
    report, records = _evaluate(model_dir, [DEMO_DNLI], protocol="all", template=template, end_of_turn=end_of_turn,
                                batch_examples=4, bucket=64)
    examples = read_dnli(DEMO_DNLI, "all")
    tokenizer = load_model(model_dir).tokenizer
    _assert_matches_naive(records, naive_torch_logps(model_dir, tokenizer, template, examples, end_of_turn))
    counts = [len(PromptEncoder(tokenizer, template).response_ids(t, end_of_turn)) for t, _ in examples[0].candidates]
    assert records[0]["token_counts"] == counts
    assert report["end_of_turn"] is end_of_turn and report["template"] == template


@pytest.mark.slow
@needs_bundled_model
def test_bundled_model_matches_naive_full_sequence_scoring(first_layers_model_path):
    # The bundled model's tokenizer, chat template and first blocks; the demo file keeps the naive
    # reference (one full forward per candidate) quick on a laptop.
    model = load_model(first_layers_model_path)
    _, records = _evaluate(model, [DEMO_DNLI], protocol="all", template="chat-en", max_examples=1, batch_examples=1)
    reference = naive_torch_logps(model.path, model.tokenizer, "chat-en", read_dnli(DEMO_DNLI, "all")[:1])
    _assert_matches_naive(records, reference)


def test_results_do_not_depend_on_batching_or_padding(tiny_llama):
    _, one = _evaluate(tiny_llama, [DEMO_DNLI], protocol="all", batch_examples=1, bucket=32)
    report, four = _evaluate(tiny_llama, [DEMO_DNLI], protocol="all", batch_examples=4, bucket=256)
    for a, b in zip(one, four):
        assert a["id"] == b["id"]
        np.testing.assert_allclose(a["logps"], b["logps"], atol=1e-4)
    assert report["compiled_lengths"] == sorted(set(report["compiled_lengths"])) and len(report["compiled_lengths"]) <= 2
    assert all(length % 256 == 0 for length in report["compiled_lengths"])


def test_mesh_scoring_matches_single_device(tiny_llama):
    import jax

    from pdpo_jax.parallel import make_mesh

    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    _, plain = _evaluate(tiny_llama, [DEMO_DNLI], protocol="all", batch_examples=3)
    mesh = make_mesh(data=4, fsdp=1, tensor=2)
    model = load_model(tiny_llama, mesh=mesh)
    report, sharded = dnli.evaluate_dnli(model, [DEMO_DNLI], dnli.DnliSettings(protocol="all", batch_examples=3), mesh=mesh)
    assert report["batch_examples"] == 4  # rounded up to the data axis
    for a, b in zip(plain, sharded):
        np.testing.assert_allclose(a["logps"], b["logps"], atol=1e-4)


# --------------------------------------------------------------------------------------------
# (a) the full report on the staged DNLI files


def _check_report_files(out: Path, subsets: list[str], per_subset: int) -> dict:
    report = json.loads(out.read_text())
    assert list(report["subsets"]) == subsets
    for entry in [*report["subsets"].values(), report["overall"]]:
        assert sum(entry["counts"].values()) == entry["n"]
        assert sum(entry["percentages"].values()) == pytest.approx(100.0)
    assert all(entry["n"] == per_subset for entry in report["subsets"].values())
    assert report["overall"]["n"] == per_subset * len(subsets)
    records = [json.loads(line) for line in out.with_suffix(".examples.jsonl").read_text().splitlines()]
    assert len(records) == report["overall"]["n"]
    assert {r["subset"] for r in records} == set(subsets)
    for record in records:
        assert record["categories"][record["predicted_index"]] == record["predicted_category"]
        assert max(record["scores"]) == record["scores"][record["predicted_index"]]
    assert "Hits@1" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]
    return report


def test_report_on_staged_files_tiny_model(shared_data, tiny_llama, tmp_path):
    """The mechanics on the real files with a tiny random model (its percentages mean nothing)."""
    files = [shared_data / "dnli" / "valid_havenot.jsonl", shared_data / "dnli" / "valid_likedislike.jsonl"]
    out = tmp_path / "report.json"
    args = ["--model", str(tiny_llama), "--data", *map(str, files), "--out", str(out), "--max-examples", "3", "--quiet"]
    assert eval_dnli.main(args) == 0
    report = _check_report_files(out, ["valid_havenot", "valid_likedislike"], 3)
    assert report["protocol"] == "31" and report["scoring"] == "sum" and report["candidates"] == 6 * 31


@pytest.mark.slow
@needs_bundled_model
def test_report_on_staged_files_bundled_model(shared_data, tmp_path, first_layers_model_path):
    """The staged files through the bundled model's tokenizer and chat template (and its first blocks)."""
    files = [shared_data / "dnli" / "valid_havenot.jsonl", shared_data / "dnli" / "valid_likedislike.jsonl"]
    out = tmp_path / "bundled.json"
    model = str(first_layers_model_path)
    assert eval_dnli.main(["--model", model, "--data", *map(str, files), "--out", str(out), "--max-examples", "2", "--quiet"]) == 0
    report = _check_report_files(out, ["valid_havenot", "valid_likedislike"], 2)
    assert report["model"] == model


# --------------------------------------------------------------------------------------------
# (c) summed vs length-normalized


def test_length_normalized_prefers_the_better_per_token_candidate():
    encoded = dnli.EncodedExample(
        example=read_dnli(DEMO_DNLI, "all")[0], subset="demo", prompt_ids=(1, 2), candidate_ids=((3,),) * 10
    )
    # candidate 0: 2 tokens, -6 in all (-3 per token); candidate 1: 8 tokens, -8 in all (-1 per token)
    logps = np.array([-6.0, -8.0] + [-50.0] * 8)
    counts = np.array([2.0, 8.0] + [5.0] * 8)
    scored = dnli.ScoredExample(encoded, logps, counts)
    assert scored.top("sum") == 0 and scored.top("mean") == 1
    assert dnli.example_record(scored, "mean")["scores"][:2] == [-3.0, -1.0]
    assert dnli.example_record(scored, "sum")["gold_rank"] == 1 and dnli.example_record(scored, "mean")["gold_rank"] == 2


def test_length_normalized_flag_divides_by_token_counts(tiny_llama, tmp_path):
    out = tmp_path / "mean.json"
    assert eval_dnli.main(["--model", str(tiny_llama), "--data", str(DEMO_DNLI), "--protocol", "all", "--out", str(out),
                      "--length-normalized", "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["scoring"] == "mean"
    for line in out.with_suffix(".examples.jsonl").read_text().splitlines():
        record = json.loads(line)
        np.testing.assert_allclose(record["scores"], np.array(record["logps"]) / np.array(record["token_counts"]), atol=1e-5)
        assert record["predicted_index"] == int(np.argmax(record["scores"]))


# --------------------------------------------------------------------------------------------
# (d) protocols


def _write_dnli(path: Path, per_group: int, rows: int = 2) -> Path:
    lines = []
    for row in range(rows):
        groups = {"label": [f"gold answer {row} ."]}
        groups |= {g: [f"{g} candidate {row} {i} ." for i in range(per_group)] for g in ("neg", "similar", "rand")}
        lines.append(json.dumps({"persona": ["i like cats .", "i live in a town ."],
                                 "prefix": ["hi , how are you ?"], "candidates": groups}))
    path.write_text("\n".join(lines) + "\n")
    return path


def test_all_protocol_uses_every_candidate(tiny_llama, tmp_path):
    data = _write_dnli(tmp_path / "twelve.jsonl", per_group=12)
    r31, rec31 = _evaluate(tiny_llama, [data], protocol="31", template="plain-en")
    rall, recall = _evaluate(tiny_llama, [data], protocol="all", template="plain-en")
    assert r31["candidates"] == 2 * 31 and rall["candidates"] == 2 * 37
    assert [len(r["scores"]) for r in rec31] == [31, 31] and [len(r["scores"]) for r in recall] == [37, 37]
    for group in ("contradict", "entail", "rand"):
        assert recall[0]["categories"].count(group) == 12 and rec31[0]["categories"].count(group) == 10
    np.testing.assert_allclose(recall[0]["logps"][:11], rec31[0]["logps"][:11], atol=1e-4)  # gold + first 10 neg


# --------------------------------------------------------------------------------------------
# (e) bad input


def test_file_given_twice_is_an_error(tiny_llama, tmp_path, capsys):
    args = ["--model", str(tiny_llama), "--data", str(DEMO_DNLI), str(DEMO_DNLI), "--out", str(tmp_path / "r.json")]
    assert cli.main(["eval-dnli", *args]) == 2
    assert "given twice" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


def test_unknown_format_and_same_subset_name_are_errors(tmp_path):
    text = tmp_path / "dialogues.txt"
    text.write_text("1 your persona: i like cats.\n2 hi\thello\n")
    with pytest.raises(dnli.DnliEvalError, match=r"dialogues\.txt: unknown DNLI file format '\.txt'"):
        dnli.read_subsets([text], "31")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = (_write_dnli(tmp_path / d / "same.jsonl", 10) for d in ("a", "b"))
    with pytest.raises(dnli.DnliEvalError, match="subset name 'same'"):
        dnli.read_subsets([first, second], "31")
    not_dnli = tmp_path / "dialogues.jsonl"
    not_dnli.write_text(json.dumps({"id": "d1", "persona": ["x ."], "turns": [{"speaker": "partner", "text": "hi"}]}) + "\n")
    with pytest.raises(ValueError, match=r"dialogues\.jsonl:1: 'prefix' must be a list of strings"):
        dnli.read_subsets([not_dnli], "31")
    with pytest.raises(ValueError, match=r"few\.jsonl:1: candidates\.neg has 3 entries; protocol '31' needs 10"):
        dnli.read_subsets([_write_dnli(tmp_path / "few.jsonl", 3)], "31")


def test_cli_reports_bad_files_without_loading_the_model(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n")
    assert cli.main(["eval-dnli", "--model", str(tmp_path / "missing"), "--data", str(bad), "--out", str(tmp_path / "r.json")]) == 2
    assert "unknown DNLI file format '.csv'" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# configuration, truncation


def test_run_config_supplies_settings_and_flags_win(tiny_llama, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model: {{path: {tiny_llama}}}\n"
        f"data: {{template: plain-en}}\n"
        f"eval: {{dnli: [{DEMO_DNLI}], protocol: all, length_normalized: true}}\n"
    )
    out = tmp_path / "cfg.json"
    assert eval_dnli.main(["--config", str(config), "eval.max_examples=2", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert (report["scoring"], report["template"], report["protocol"], report["overall"]["n"]) == ("mean", "plain-en", "all", 2)
    assert eval_dnli.main(["--config", str(config), "--template", "chat-en", "--max-examples", "1", "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert (report["template"], report["overall"]["n"]) == ("chat-en", 1)


def test_long_history_is_cut_to_the_maximum_length(tiny_llama):
    tokenizer = load_model(tiny_llama).tokenizer
    encoder = PromptEncoder(tokenizer, "plain-en")
    example = read_dnli(DEMO_DNLI, "all")[0]  # three history turns
    full = dnli.encode_example(example, "demo", encoder)
    longest = max(len(c) for c in full.candidate_ids)
    cut = dnli.encode_example(example, "demo", encoder, max_length=len(full.prompt_ids) + longest - 1)
    assert cut.dropped_history_turns == 2 and cut.candidate_ids == full.candidate_ids
    assert cut.prompt_ids == tuple(encoder.prompt_ids(example.persona, example.history[2:]))


# --------------------------------------------------------------------------------------------
# (e) a stopped evaluation resumes from its journal


class Stopped(Exception):
    pass


def count_scorer_calls(monkeypatch, stop_after: int | None = None) -> list[int]:
    """Wraps the scorer `evaluate_dnli` makes: its calls are counted, and with `stop_after` the
    call after that many raises Stopped, as if the evaluation were killed there."""
    from pdpo_jax.scoring import make_scorer  # the real one, however often dnli's was replaced

    calls: list[int] = []

    def counting(model, num_sequences, mesh=None):
        score = make_scorer(model, num_sequences, mesh)

        def run(batch):
            if stop_after is not None and len(calls) == stop_after:
                raise Stopped
            calls.append(1)
            return score(batch)

        return run

    monkeypatch.setattr(dnli, "make_scorer", counting)
    return calls


def test_a_stopped_evaluation_resumes_from_its_journal_to_the_same_records(tiny_llama, tmp_path, monkeypatch):
    from pdpo_jax.evaluate import score_journal
    from pdpo_jax.storage import read_jsonl

    monkeypatch.setattr(score_journal, "WRITE_EVERY_SECONDS", 0.0)
    model = load_model(tiny_llama)
    settings = dnli.DnliSettings(protocol="all", batch_examples=1)
    calls = count_scorer_calls(monkeypatch)
    _, whole = dnli.evaluate_dnli(model, [DEMO_DNLI], settings)
    batches = len(calls)
    assert batches >= 5
    out = tmp_path / "dnli.json"
    count_scorer_calls(monkeypatch, stop_after=3)
    with pytest.raises(Stopped):
        dnli.evaluate_dnli(model, [DEMO_DNLI], settings, resume_from=out)
    journal = dnli.output_paths(out)["journal"]
    assert [line.get("batch") for line in read_jsonl(journal)] == [None, 0, 1, 2]  # the header, then 3 batches

    calls = count_scorer_calls(monkeypatch)
    report, records = dnli.evaluate_dnli(model, [DEMO_DNLI], settings, resume_from=out)
    assert len(calls) == batches - 3 + 1  # batch 0 is scored again, to check the journal against the model
    assert records == whole
    dnli.write_outputs(report, records, out)
    assert out.exists() and not journal.exists()


def test_a_journal_from_another_model_at_the_same_path_is_dropped(tiny_llama, tmp_path, monkeypatch):
    import dataclasses

    import jax

    from pdpo_jax.evaluate import score_journal

    monkeypatch.setattr(score_journal, "WRITE_EVERY_SECONDS", 0.0)
    model = load_model(tiny_llama)
    settings = dnli.DnliSettings(protocol="all", batch_examples=1)
    out = tmp_path / "dnli.json"
    count_scorer_calls(monkeypatch, stop_after=3)
    with pytest.raises(Stopped):
        dnli.evaluate_dnli(model, [DEMO_DNLI], settings, resume_from=out)
    retrained = dataclasses.replace(model, params=jax.tree.map(lambda leaf: leaf * 1.5, model.params))
    calls = count_scorer_calls(monkeypatch)
    _, fresh = dnli.evaluate_dnli(retrained, [DEMO_DNLI], settings)
    batches = len(calls)
    calls = count_scorer_calls(monkeypatch)
    _, resumed = dnli.evaluate_dnli(retrained, [DEMO_DNLI], settings, resume_from=out)
    assert len(calls) == batches and resumed == fresh  # nothing of the first model's scores is kept
    count_scorer_calls(monkeypatch)
    _, other_settings = dnli.evaluate_dnli(retrained, [DEMO_DNLI], dataclasses.replace(settings, bucket=64),
                                           resume_from=out)  # another header: the journal is not read
    assert [r["predicted_index"] for r in other_settings] == [r["predicted_index"] for r in fresh]
