"""make-prefs on a slice of the staged PersonaChat data with tiny random models: swapped personas,
the no-shuffle ablation, exact resumption after SIGKILL, reference log-probs against PyTorch,
a generator other than the reference, degenerate negatives, and the reader's validation."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prefs_fixtures import (STORED_RECORD_LINE, corpus_text, staged_slice, tiny_gpt2_that_stops, tiny_llama_with_words,
                            write_config)

from pdpo_jax import cli
from pdpo_jax import prefs
from pdpo_jax.data import PromptEncoder
from pdpo_jax.model import load_model
from pdpo_jax.model.digest import model_digest
from pdpo_jax.stages import make_prefs
from pdpo_jax.storage import DONE_MARKER
from pdpo_jax.data.pairs import PairIds
from pdpo_jax.data.tokenization import history_drop_choices
from pdpo_jax.data.trees import pair_trees
from pdpo_jax.generation import cut_at_stop

REPO_ROOT = Path(__file__).resolve().parents[1]
# fp32 sums of a response's token log-probs, from a trunk row against a row of the pair's own
TREE_LOGP_TOL = 1e-4


@pytest.fixture(scope="module")
def setup(shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    train, val, dialogues = staged_slice(shared_data, root / "data")
    return {
        "root": root, "train": train, "val": val, "dialogues": {d.id: d for d in dialogues},
        "llama": tiny_llama_with_words(root, corpus_text(dialogues)),
        "stopper": tiny_gpt2_that_stops(root, corpus_text(dialogues)),
    }


def config_file(setup, name: str, **prefs_settings) -> Path:
    prefs_settings.setdefault("generator", setup["llama"])
    prefs_settings.setdefault("reference", setup["llama"])
    return write_config(setup["root"] / f"{name}.yaml", train=setup["train"], val=setup["val"],
                        run_dir=setup["root"] / name, **prefs_settings)


@pytest.fixture(scope="module")
def shuffled_run(setup):
    """One uninterrupted run: the records the other tests compare against."""
    assert make_prefs.main(["--config", str(config_file(setup, "shuffled"))]) == 0
    return setup["root"] / "shuffled" / "prefs"


def all_records(prefs_dir: Path, include_dropped: bool = True) -> list[dict]:
    return [r for split in prefs.SPLITS for r in prefs.read_preference_pairs(prefs_dir, split, include_dropped=include_dropped)]


def shard_bytes(prefs_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(prefs_dir).as_posix(): p.read_bytes() for p in sorted(prefs_dir.glob("*/shard-*.jsonl"))}


def test_every_negative_is_sampled_under_another_dialogues_persona(setup, shuffled_run):
    dialogues = setup["dialogues"]
    summary = json.loads((shuffled_run / "summary.json").read_text())
    assert summary["splits"]["train"]["records"] == 10 and summary["splits"]["val"]["records"] == 3
    assert summary["splits"]["train"]["shards"] == 3  # 4 + 4 + 2 examples
    for record in all_records(shuffled_run):
        own, donor = dialogues[record["dialogue_id"]], dialogues[record["donor_dialogue_id"]]
        assert record["shuffled"] is True
        assert record["donor_dialogue_id"] != record["dialogue_id"]
        assert record["persona"] == list(own.persona) and record["donor_persona"] == list(donor.persona)
        assert record["donor_persona"] != record["persona"]
        assert record["example_id"].startswith(record["dialogue_id"] + "#")
    val_donors = {r["donor_dialogue_id"] for r in prefs.read_preference_pairs(shuffled_run, "val")}
    val_ids = {r["dialogue_id"] for r in prefs.read_preference_pairs(shuffled_run, "val")}
    assert val_donors <= val_ids  # personas are swapped within a split


def test_records_carry_provenance(setup, shuffled_run):
    records = all_records(shuffled_run)
    seeds = {(r["split"], r["example_id"]): (r["sample_seed"], r["sample_row"]) for r in records}
    first_train = [r for r in records if r["split"] == "train"][:4]  # shard 0: batches of 3 and 1
    assert [r["sample_row"] for r in first_train] == [0, 1, 2, 0]
    assert [r["sample_seed"] for r in first_train] == [prefs.sample_seed(7, "train", 0, b) for b in (0, 0, 0, 1)]
    assert len(set(seeds.values())) == len(records)
    digest = model_digest(load_model(setup["llama"]))
    for r in records:
        assert r["generator"] == r["reference"] == str(setup["llama"])
        assert r["generator_digest"] == r["reference_digest"] == digest
        assert r["sampler"] == {"kind": "TopP", "p": 0.9, "temperature": 1.0} and r["max_new_tokens"] == 8
        assert r["rejected_tokens"] <= 8 + 1  # sampled tokens plus the end of turn


def test_no_shuffle_ablation_keeps_the_own_persona_and_defaults_to_sft_best(setup):
    """Also: with no generator/reference configured, both are <run_dir>/sft/best (an orbax dir)."""
    from pdpo_jax.train.checkpoints import save_best_params

    run_dir = setup["root"] / "ablation"
    base = load_model(setup["llama"])
    save_best_params(run_dir / "sft" / "best", base.params, setup["llama"], {"step": 0})
    config = config_file(setup, "ablation", shuffle=False, generator=None, reference=None)
    assert make_prefs.main(["--config", str(config)]) == 0
    records = all_records(run_dir / "prefs")
    assert len(records) == 13
    best = str(run_dir / "sft" / "best")
    for r in records:
        assert r["shuffled"] is False
        assert r["donor_dialogue_id"] == r["dialogue_id"] and r["donor_persona"] == r["persona"]
        assert r["generator"] == r["reference"] == best
        assert r["generator_digest"] == model_digest(load_model(best)) == model_digest(base)  # same weights, other layout


KILLER = """
import os, signal, sys
from pdpo_jax.stages import make_prefs
kill_at, written = int(sys.argv[1]), []
rename = os.replace
def rename_or_die(source, target):  # shards are written to a temporary file, then renamed into place
    if "shard-" in os.fspath(target):
        if len(written) == kill_at:  # killed mid-write: a torn temporary file stays, no shard
            os.kill(os.getpid(), signal.SIGKILL)
        written.append(target)
    rename(source, target)
os.replace = rename_or_die
sys.exit(make_prefs.main(sys.argv[2:]))
"""


def test_a_run_killed_midway_and_rerun_writes_exactly_the_uninterrupted_records(setup, shuffled_run, subprocess_env):
    config = config_file(setup, "killed")
    killed = subprocess.run([sys.executable, "-c", KILLER, "1", "--config", str(config)], cwd=REPO_ROOT, env=subprocess_env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    prefs_dir = setup["root"] / "killed" / "prefs"
    assert sorted(shard_bytes(prefs_dir)) == ["train/shard-00000.jsonl"]
    assert not (prefs_dir / DONE_MARKER).exists()
    with pytest.raises(prefs.PrefsError, match="no DONE marker"):
        prefs.read_preference_pairs(prefs_dir, "train")

    assert make_prefs.main(["--config", str(config)]) == 0
    assert shard_bytes(prefs_dir) == shard_bytes(shuffled_run)
    assert json.loads((prefs_dir / "summary.json").read_text()) == json.loads((shuffled_run / "summary.json").read_text())
    shards_written = [json.loads(line)["shard"] for line in (prefs_dir / "metrics.jsonl").read_text().splitlines()]
    assert shards_written == [0, 1, 2, 0]  # train 0 before the kill; train 1, 2 and val 0 after: no shard twice


def test_progress_advances_after_every_sampling_batch(setup, monkeypatch):
    import tqdm.auto

    updates, totals = [], []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            totals.append(kwargs["total"])
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            updates.append(n)
            return super().update(n)

    monkeypatch.setattr(make_prefs, "tqdm", RecordingBar)
    assert make_prefs.main(["--config", str(config_file(setup, "progress"))]) == 0
    metrics = (setup["root"] / "progress" / "prefs" / "metrics.jsonl").read_text().splitlines()
    # shard_size 4 with batch_size 3: a full shard moves the bar by 3, then by 1
    assert len(updates) > len(metrics) and 3 in updates and set(updates) <= {1, 2, 3}
    assert sum(updates) == totals[0]


def test_reference_logps_match_pytorch_scoring(setup, shuffled_run):
    import torch
    import transformers

    from pdpo_jax.data.tokenization import PromptEncoder

    tokenizer = transformers.AutoTokenizer.from_pretrained(setup["llama"])
    encoder = PromptEncoder(tokenizer, "chat-en")
    model = transformers.AutoModelForCausalLM.from_pretrained(setup["llama"], dtype=torch.float32).eval()
    records = prefs.read_preference_pairs(shuffled_run, "train")
    for record in (records[1], records[-1]):
        prompt = encoder.prompt_ids(record["persona"], record["history"])
        for side in ("chosen", "rejected"):
            response = encoder.response_ids(record[side])
            ids = torch.tensor([prompt + response])
            with torch.no_grad():
                logps = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            targets = ids[0, 1:]
            scored = logps[torch.arange(len(targets)), targets][len(prompt) - 1 :]
            assert record[f"{side}_tokens"] == len(response) == len(scored)
            assert abs(record[f"ref_{side}_logp"] - scored.sum().item()) < 1e-3


def test_another_generator_and_dropping_degenerate_negatives(setup):
    config = config_file(setup, "cross", generator=setup["stopper"], drop_degenerate=True,
                         sampler={"kind": "temperature", "temperature": 1.0})
    assert make_prefs.main(["--config", str(config)]) == 0
    prefs_dir = setup["root"] / "cross" / "prefs"
    summary = json.loads((prefs_dir / "summary.json").read_text())
    everything = all_records(prefs_dir)
    kept = all_records(prefs_dir, include_dropped=False)
    degenerate = [r for r in everything if r["degenerate"]]
    assert degenerate and kept, "the stopping generator must give both kinds"
    assert len(kept) == len(everything) - len(degenerate)
    assert all(not r["degenerate"] and not r["dropped"] for r in kept)
    assert all(r["dropped"] for r in degenerate)
    for split in prefs.SPLITS:
        counts, records = summary["splits"][split], [r for r in everything if r["split"] == split]
        assert counts["records"] == len(records)
        assert counts["dropped"] == counts["degenerate_records"] == sum(bool(r["degenerate"]) for r in records)
        assert counts["kept"] == sum(not r["dropped"] for r in records)
        for reason in prefs.DEGENERATE_REASONS:
            assert counts["degenerate"][reason] == sum(reason in r["degenerate"] for r in records)
    assert sum(summary["splits"][s]["degenerate"]["empty"] for s in prefs.SPLITS) > 0
    assert {r["rejected"] for r in everything if "empty" in r["degenerate"]} == {""}

    # negatives cross as text: the reference re-tokenizes them with its own tokenizer
    from transformers import AutoTokenizer

    from pdpo_jax.data.tokenization import PromptEncoder

    reference = PromptEncoder(AutoTokenizer.from_pretrained(setup["llama"]), "chat-en")
    for r in everything:
        assert r["generator"] == str(setup["stopper"]) and r["reference"] == str(setup["llama"])
        assert r["generator_digest"] != r["reference_digest"]
        assert r["rejected_tokens"] == len(reference.response_ids(r["rejected"]))


def test_rerun_with_other_settings_is_refused(setup, shuffled_run, capsys):
    config = config_file(setup, "shuffled")
    assert cli.main(["make-prefs", "--config", str(config), "prefs.seed=8"]) == 2
    error = capsys.readouterr().err
    assert "prefs.seed: was 7, now 8" in error and error.startswith("pdpo make-prefs: ") and error.count("\n") == 1
    before = shard_bytes(shuffled_run)
    assert make_prefs.main(["--config", str(config)]) == 0  # same settings: finished, nothing rewritten
    assert shard_bytes(shuffled_run) == before


def test_reader_names_file_and_line_of_a_bad_record(shuffled_run, tmp_path):
    copy = tmp_path / "prefs"
    shutil.copytree(shuffled_run, copy)
    shard = copy / "train" / "shard-00001.jsonl"
    lines = shard.read_text().splitlines()

    lines[1] = lines[1][:-5]
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(prefs.PrefsError, match=r"shard-00001\.jsonl:2: not valid JSON"):
        prefs.read_preference_pairs(copy, "train")

    record = json.loads(lines[0])
    del record["ref_rejected_logp"]
    lines[1] = json.dumps(record)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(prefs.PrefsError, match=r"shard-00001\.jsonl:2: record lacks field\(s\) \['ref_rejected_logp'\]"):
        prefs.read_preference_pairs(copy, "train")

    record["ref_rejected_logp"] = float("nan")
    lines[1] = json.dumps(record)
    shard.write_text("\n".join(lines) + "\n")
    with pytest.raises(prefs.PrefsError, match=r"shard-00001\.jsonl:2: field 'ref_rejected_logp'"):
        prefs.read_preference_pairs(copy, "train")

    shard.unlink()
    with pytest.raises(prefs.PrefsError, match="missing"):
        prefs.read_preference_pairs(copy, "train")
    with pytest.raises(prefs.PrefsError, match="split must be one of"):
        prefs.read_preference_pairs(copy, "test")


def test_degenerate_reasons():
    assert prefs.degenerate_reasons("", "hi there .", stopped=True) == ["empty"]
    assert prefs.degenerate_reasons("  ", "hi there .", stopped=False) == ["empty", "truncated"]
    assert prefs.degenerate_reasons("Hi there!", "hi there .", stopped=True) == ["same_as_chosen"]
    assert prefs.degenerate_reasons("i'm fine", "i am fine .", stopped=True) == ["same_as_chosen"]
    assert prefs.degenerate_reasons("i like dogs", "hi there .", stopped=False) == ["truncated"]
    assert prefs.degenerate_reasons("i like dogs", "hi there .", stopped=True) == []


def test_cut_at_stop_takes_the_earliest_stop_sequence():
    assert cut_at_stop([5, 6, 2, 7], [(2,), (9, 9)]) == ([5, 6], True)
    assert cut_at_stop([5, 9, 9, 2], [(2,), (9, 9)]) == ([5], True)
    assert cut_at_stop([5, 9, 8], [(2,), (9, 9)]) == ([5, 9, 8], False)
    assert cut_at_stop([2], [(2,)]) == ([], True)


def test_history_is_shortened_oldest_first_keeping_a_partner_line_first():
    assert history_drop_choices(0) == [0]
    assert history_drop_choices(1) == [0, 1]
    assert history_drop_choices(5) == [0, 2, 4, 5]
    assert history_drop_choices(4) == [0, 1, 3, 4]

    class CountingEncoder(PromptEncoder):  # a prompt costs 10 tokens of persona plus 3 per turn
        def __init__(self):
            pass

        def prompt_ids(self, persona, history):
            return [0] * (10 + 3 * len(history))

    history = ("p1", "m1", "p2", "m2", "p3")
    assert CountingEncoder().fit_history(["x"], history, room=25) == history
    assert CountingEncoder().fit_history(["x"], history, room=21) == ("p2", "m2", "p3")
    assert CountingEncoder().fit_history(["x"], history, room=12) == ()
    assert CountingEncoder().fit_history(["x"], history, room=9) is None


def test_sample_seeds_differ_by_split_shard_and_batch():
    seeds = {prefs.sample_seed(0, split, shard, batch) for split in prefs.SPLITS for shard in range(3) for batch in range(3)}
    assert len(seeds) == 18 and all(0 <= s < 2**31 for s in seeds)
    assert prefs.sample_seed(0, "train", 1, 2) == prefs.sample_seed(0, "train", 1, 2) != prefs.sample_seed(1, "train", 1, 2)


def test_tree_layout_dpo_starts_from_the_stored_reference_logps(setup, shuffled_run):
    """The records' reference log-probs were scored by make-prefs' own rows; a DPO run in the tree
    layout starts at loss ln 2 with zero margins only if its rows give the same log-probs."""
    from pdpo_jax.stages import dpo

    run_dir = setup["root"] / "tree-dpo"
    shutil.copytree(shuffled_run, run_dir / "prefs")
    config = config_file(setup, "tree-dpo")
    assert dpo.main(["--config", str(config), "dpo.layout=tree", "dpo.max_steps=1", "dpo.eval_every=1",
                     "dpo.batch_size=8"]) == 0  # eight test devices: all five trees in one step
    summary = json.loads((run_dir / "dpo" / DONE_MARKER).read_text())
    assert summary["start_check"].startswith("ok"), summary["start_check"]
    trees = json.loads((run_dir / "dpo" / "data_summary.json").read_text())["train_trees"]
    assert trees["pairs"] == 10 and trees["trees"] == 5  # five dialogues of two model turns, one tree each


def test_tree_layout_scores_what_per_pair_rows_score(setup, shuffled_run):
    """The default (tree) run's stored log-probs against the per-pair scorer on the same records,
    and the two scorers on one batch of them."""
    model = load_model(setup["llama"])
    reference = prefs.Side(str(setup["llama"]), model, PromptEncoder(model.tokenizer, "chat-en"), "", None)
    records = prefs.read_preference_pairs(shuffled_run, "train")
    assert json.loads((shuffled_run / prefs.SETTINGS_FILE).read_text())["prefs"]["layout"] == "tree"
    prompts = [reference.encoder.prompt_ids(r["persona"], r["history"]) for r in records]
    chosen = [reference.encoder.response_ids(r["chosen"]) for r in records]
    rejected = [reference.encoder.response_ids(r["rejected"]) for r in records]
    per_pair = prefs.ScoreFn(reference, rows=len(records), length_bucket=64)(prompts, chosen, rejected)
    tree = prefs.TreeScoreFn(reference, rows=len(records), length_bucket=64)(prompts, chosen, rejected)
    stored = ([r["ref_chosen_logp"] for r in records], [r["ref_rejected_logp"] for r in records],
              [r["chosen_tokens"] for r in records], [r["rejected_tokens"] for r in records])
    assert len(pair_trees([PairIds(tuple(p), tuple(c), tuple(r)) for p, c, r in zip(prompts, chosen, rejected)])) == 5
    for ours, theirs, kept in zip(tree, per_pair, stored):
        np.testing.assert_allclose(ours, theirs, atol=TREE_LOGP_TOL, rtol=0)
        np.testing.assert_allclose(kept, theirs, atol=TREE_LOGP_TOL, rtol=0)


def test_per_turn_layout_draws_the_same_negatives_and_a_folder_keeps_its_layout(setup, shuffled_run, capsys):
    config = config_file(setup, "per-turn", layout="per_turn")
    assert make_prefs.main(["--config", str(config)]) == 0
    per_turn, tree = all_records(setup["root"] / "per-turn" / "prefs"), all_records(shuffled_run)
    provenance = ("example_id", "donor_dialogue_id", "history", "sample_seed", "sample_row", "chosen", "rejected")
    # one seed per batch and the same rows: the same random numbers, drawn from logits equal to fp32 rounding
    assert [[r[k] for k in provenance] for r in per_turn] == [[r[k] for k in provenance] for r in tree]
    for key in ("ref_chosen_logp", "ref_rejected_logp"):
        np.testing.assert_allclose([r[key] for r in per_turn], [r[key] for r in tree], atol=TREE_LOGP_TOL, rtol=0)
    assert cli.main(["make-prefs", "--config", str(config_file(setup, "shuffled")), "prefs.layout=per_turn"]) == 2
    assert "prefs.layout: was 'tree', now 'per_turn'" in capsys.readouterr().err


def test_a_folder_begun_before_the_layout_setting_resumes_per_turn(setup, shuffled_run, tmp_path):
    folder = tmp_path / "prefs"
    shutil.copytree(shuffled_run, folder)
    old = json.loads((folder / prefs.SETTINGS_FILE).read_text())
    del old["prefs"]["layout"]
    (folder / prefs.SETTINGS_FILE).write_text(json.dumps(old))
    settings = json.loads(json.dumps(old))
    prefs.check_settings(folder, dict(settings, prefs=dict(settings["prefs"], layout="per_turn")))
    with pytest.raises(prefs.PrefsError, match="prefs.layout: was 'per_turn', now 'tree'"):
        prefs.check_settings(folder, dict(settings, prefs=dict(settings["prefs"], layout="tree")))


def test_the_same_model_at_another_path_resumes_a_folder_and_other_weights_do_not(shuffled_run, tmp_path):
    """The models are compared by their digests: the same weights linked or copied elsewhere
    resume a folder (which keeps the path it was made from); other weights at the same path, or a
    run that loads no model and so has no digest (a finished folder re-filtered), behave as such."""
    folder = tmp_path / "prefs"
    shutil.copytree(shuffled_run, folder)
    old = json.loads((folder / prefs.SETTINGS_FILE).read_text())
    moved = json.loads(json.dumps(old))
    moved["generator"]["path"] = "/elsewhere/sft/best"
    assert prefs.check_settings(folder, moved)["generator"] == old["generator"]
    unloaded = json.loads(json.dumps(moved))
    unloaded["generator"]["digest"] = unloaded["reference"]["digest"] = None
    assert prefs.check_settings(folder, unloaded)["generator"] == old["generator"]
    retrained = json.loads(json.dumps(old))
    retrained["generator"]["digest"] = "sha256:" + "0" * 64
    with pytest.raises(prefs.PrefsError, match="generator.digest: was"):
        prefs.check_settings(folder, retrained)


def test_tree_layout_cuts_a_dialogues_histories_so_they_nest():
    from pdpo_jax.data.examples import Example

    class CountingEncoder(PromptEncoder):  # a prompt costs 10 tokens of persona plus 3 per line
        def __init__(self):
            pass

        def prompt_ids(self, persona, history):
            return [0] * (10 + 3 * len(history))

    lines = [f"p{i // 2}" if i % 2 == 0 else f"m{i // 2}" for i in range(9)]
    jobs = [prefs.PairJob(Example(f"d#{t}", "d", ("x",), tuple(lines[: 2 * t + 1]), lines[2 * t + 1] if t < 4 else "m4"),
                          "e", ("y",)) for t in range(5)]
    jobs.append(prefs.PairJob(Example("e#0", "e", ("y",), ("q0",), "n0"), "d", ("x",)))
    personas, reserved = [job.donor_persona for job in jobs], [0] * len(jobs)
    per_turn = prefs.kept_histories(jobs, personas, reserved, 25, CountingEncoder(), nested=False)
    assert [len(h) for h in per_turn] == [1, 3, 5, 5, 5, 1]  # turns 3 and 4 start two lines apart: no nesting
    assert per_turn[3][0] == "p1" and per_turn[4][0] == "p2"
    nested = prefs.kept_histories(jobs, personas, reserved, 25, CountingEncoder(), nested=True)
    assert [h[:1] for h in nested] == [("p0",)] * 3 + [("p2",)] * 2 + [("q0",)]  # two chunks, then dialogue e
    for earlier, later, job in zip(nested[:2], nested[1:3], jobs):
        assert later[: len(earlier) + 1] == earlier + (job.example.response,)
    assert all(10 + 3 * len(h) <= 25 for h in nested)
    # A pair never keeps more history than its negative was sampled with.
    within = [h[2:] if len(h) > 2 else h for h in nested]
    pairs = prefs.kept_histories(jobs, personas, reserved, 100, CountingEncoder(), nested=True, within=within)
    assert all(len(p) <= len(w) for p, w in zip(pairs, within))
    assert prefs.kept_histories(jobs[:1], personas[:1], [20], 25, CountingEncoder(), nested=True) == [None]


def test_a_stored_record_reads_typed_and_writes_back_the_same_bytes(tmp_path):
    record = prefs.PreferenceRecord.from_json_line(STORED_RECORD_LINE, "stored")
    assert record.persona == ("i love cats .", "私は猫が好きです。") and record.history[-1] == "a dog named rex ."
    assert record.ref_chosen_logp == -41.83720397949219 and record.sample_row == 5 and record.degenerate == ()
    assert record.to_json_line() == STORED_RECORD_LINE
    shard = tmp_path / "train" / "shard-00000.jsonl"
    prefs.write_shard(shard, [record, record])
    assert shard.read_bytes() == (STORED_RECORD_LINE + "\n").encode("utf-8") * 2
    assert prefs.read_shard(shard) == [record, record]


def test_every_record_of_a_run_writes_back_the_bytes_make_prefs_wrote(shuffled_run, tmp_path):
    for path in sorted(shuffled_run.glob("*/shard-*.jsonl")):
        copy = tmp_path / path.relative_to(shuffled_run)
        prefs.write_shard(copy, prefs.read_shard(path))
        assert copy.read_bytes() == path.read_bytes()


def test_a_bad_field_is_named_with_its_file_and_line(tmp_path):
    stored = json.loads(STORED_RECORD_LINE)
    for field, bad in (("sample_row", -1), ("persona", "i love cats ."), ("generator_digest", "md5:0"),
                       ("degenerate", ["boring"]), ("chosen_tokens", 0), ("split", "test")):
        shard = tmp_path / f"{field}.jsonl"
        shard.write_text(STORED_RECORD_LINE + "\n" + json.dumps(dict(stored, **{field: bad})) + "\n")
        with pytest.raises(prefs.PrefsError, match=rf"{field}\.jsonl:2: field '{field}' has an invalid value"):
            prefs.read_shard(shard)
    with pytest.raises(prefs.PrefsError, match=r"^somewhere:9: unknown field\(s\) \['extra'\]$"):
        prefs.PreferenceRecord.from_json(dict(stored, extra=1), "somewhere:9")
    with pytest.raises(prefs.PrefsError, match=r"^somewhere:9: record is marked dropped but not degenerate$"):
        prefs.PreferenceRecord.from_json(dict(stored, dropped=True), "somewhere:9")
    with pytest.raises(prefs.PrefsError, match=r"^somewhere:9: a record must be a JSON object, got list$"):
        prefs.PreferenceRecord.from_json([], "somewhere:9")
