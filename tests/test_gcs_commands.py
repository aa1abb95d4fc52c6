"""The commands that read reports and write tables, on `gs://` (the local GCS emulator): `pdpo
results`, `pdpo judge` and `pdpo annotate` on a bucket's files, `pdpo data inspect gs://...`, and
`pdpo default-model` and `pdpo data download` writing their folders to a bucket. Each is run on the
bucket and on disk from the same inputs, and must give the same outputs.

Cheap: no model is trained or loaded (the GGUF is a 2-layer toy); about 20 s in all on a busy 2-core machine.
"""

from __future__ import annotations

import json
from pathlib import Path

from gcs_fixtures import gcs_bucket, gcs_emulator  # noqa: F401 - fixtures
from judge_fixtures import ScriptedJudgeServer, write_responses
from pdpo_jax import cli, storage
from pdpo_jax.object_store import as_path, filesystem
from test_default_model import write_tiny_llama_gguf
from test_download import cli_args, server, synthetic_tgz  # noqa: F401 - fixtures
from test_judge import _fake_key, alpha_wins, argv_for, dialogue_rows  # noqa: F401 - _fake_key: the judge's API key
from test_results_table import MODELS, write_eval

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pdpo_jax" / "resources" / "demo"


def upload_tree(local: Path, url: str) -> str:
    """Every file under `local` copied to the same names under the gs:// folder `url`."""
    fs = filesystem()
    for path in sorted(local.rglob("*")):
        if path.is_file():
            fs.pipe_file(f"{url[5:]}/{path.relative_to(local).as_posix()}", path.read_bytes())
    return url


def objects_under(url: str) -> dict[str, bytes]:
    fs = filesystem()
    prefix = url[len("gs://"):].rstrip("/")
    return {key[len(prefix) + 1:]: fs.cat_file(key) for key in fs.find(prefix)}


def files_under(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    status = cli.main(argv)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_results_reads_reports_from_a_bucket_and_writes_its_tables_there(gcs_bucket, tmp_path, capsys):
    inputs = tmp_path / "inputs"
    reports = {name: write_eval(inputs, name, seed, shift=0.5 * seed) for seed, name in enumerate(MODELS)}
    (inputs / "sft_metrics.jsonl").write_text("".join(json.dumps({"step": s, "split": "val", "loss": 3.0 - s}) + "\n"
                                                      for s in range(3)))
    conversations = [{"id": f"c{i}", "persona": [f"i like {i} cats ."], "history": ["hi", f"q{i}?"]} for i in range(3)]
    storage.atomic_write_jsonl(inputs / "talks.jsonl", conversations)
    for model in ("SFT", "PseudoDPO"):
        storage.atomic_write_jsonl(inputs / f"{model}.jsonl", [{**c, "response": f"{model} says {c['id']}"} for c in conversations])
    bucket_inputs = upload_tree(inputs, f"{gcs_bucket}/inputs")

    def argv(root: str, out: str) -> list[str]:
        return ["results", *(a for name, path in reports.items()
                             for a in ("--model", f"{name}={root}/{path.relative_to(inputs).as_posix()}")),
                "--reference", "sft", "--bootstrap-samples", "200", "--curves", f"sft={root}/sft_metrics.jsonl",
                "--conversations", f"{root}/talks.jsonl", "--responses", f"SFT={root}/SFT.jsonl",
                "--responses", f"PseudoDPO={root}/PseudoDPO.jsonl", "--out", out]

    status, _, err = run(argv(str(inputs), str(tmp_path / "local")), capsys)
    assert status == 0, err
    status, out, err = run(argv(bucket_inputs, f"{gcs_bucket}/results"), capsys)
    assert status == 0, err
    assert f"{gcs_bucket}/results/table.json" in out
    local, remote = files_under(tmp_path / "local"), objects_under(f"{gcs_bucket}/results")
    assert sorted(remote) == sorted(local) == ["curves.png", "dnli.png", "examples.md", "score_shifts.json",
                                               "table.json", "table.md"]
    for name in ("table.json", "table.md", "score_shifts.json", "examples.md"):  # naming the inputs where they are
        assert remote[name] == local[name].replace(str(inputs).encode(), bucket_inputs.encode()), name
    assert not (tmp_path / "gs:").exists() and not Path("gs:").exists()


def test_data_inspect_reads_files_on_a_bucket(gcs_bucket, capsys):
    fs = filesystem()
    for name in ("dialogues.txt", "dnli_eval.jsonl"):
        fs.pipe_file(f"{gcs_bucket[5:]}/data/{name}", (DEMO / name).read_bytes())
    status, local, err = run(["data", "inspect", "--protocol", "all", str(DEMO / "dialogues.txt"), str(DEMO / "dnli_eval.jsonl")],
                             capsys)
    assert status == 0, err
    status, remote, err = run(["data", "inspect", "--protocol", "all", f"{gcs_bucket}/data/dialogues.txt",
                               f"{gcs_bucket}/data/dnli_eval.jsonl"],
                              capsys)
    assert status == 0, err
    local, remote = json.loads(local), json.loads(remote)
    assert [entry.pop("path") for entry in remote] == [f"{gcs_bucket}/data/dialogues.txt", f"{gcs_bucket}/data/dnli_eval.jsonl"]
    for entry in local:
        entry.pop("path")
    assert remote == local and [e["format"] for e in remote] == ["fbdialog", "dnli"]

    status, _, err = run(["data", "inspect", f"{gcs_bucket}/data/missing.txt"], capsys)
    assert status == 2 and err == f"pdpo data: no such object: {gcs_bucket}/data/missing.txt\n"


def test_judge_and_annotate_read_and_write_a_bucket(gcs_bucket, tmp_path, capsys):
    """`pdpo judge --responses gs://... --out gs://...`, its answer cache on the bucket (a rerun asks
    nothing), then a human study made from that judge folder and reported beside it."""
    files = [write_responses(tmp_path / f"{model}.jsonl", model, dialogue_rows(model, 4)) for model in ("alpha", "beta")]
    upload_tree(tmp_path, f"{gcs_bucket}/responses")
    remote_files = [f"{gcs_bucket}/responses/{model}.jsonl" for model in ("alpha", "beta")]
    judge_dir = f"{gcs_bucket}/judge"
    with ScriptedJudgeServer(alpha_wins) as server:
        status, _, err = run(["judge", *argv_for(server, files, tmp_path / "local-judge")], capsys)
        assert status == 0, err
        status, _, err = run(["judge", *argv_for(server, remote_files, judge_dir)], capsys)
        assert status == 0, err
        asked = server.request_count // 2  # by each of the two runs
        status, _, err = run(["judge", *argv_for(server, remote_files, judge_dir)], capsys)  # from the cache
        assert status == 0, err
        assert server.request_count == 2 * asked
    remote = json.loads(as_path(f"{judge_dir}/judge_results.json").read_text())
    local = json.loads((tmp_path / "local-judge" / "judge_results.json").read_text())
    assert remote["requests_sent"] == 0 and local["requests_sent"] == asked
    assert remote["responses"] == [{"model": m, "path": p} for m, p in zip(("alpha", "beta"), remote_files)]
    assert remote["cache"]["path"] == f"{judge_dir}/judge_cache.jsonl"
    for key in ("responses", "cache", "requests_sent"):
        remote.pop(key), local.pop(key)
    assert remote == local
    assert len(storage.read_jsonl(f"{judge_dir}/judge_cache.jsonl")) == asked

    db = tmp_path / "study.db"
    status, out, err = run(["annotate", "init", "--db", str(db), "--pairs", judge_dir], capsys)
    assert status == 0, err
    assert "4 items comparing alpha, beta" in out
    status, out, err = run(["annotate", "report", "--db", str(db), "--judge", judge_dir,
                            "--out", f"{gcs_bucket}/study/report.json"], capsys)
    assert status == 0, err
    report = json.loads(as_path(f"{gcs_bucket}/study/report.json").read_text())
    assert report["study"]["judge"] == judge_dir and [row["judge"] for row in report["items"]] == ["win"] * 4
    assert sorted(objects_under(f"{gcs_bucket}/study")) == ["report.json", "report.md"]  # no votes: no plot
    status, _, err = run(["annotate", "export", "--db", f"{gcs_bucket}/study.db", "--out", str(tmp_path / "v.jsonl")],
                         capsys)
    assert status == 2 and err.startswith(f"pdpo annotate: {gcs_bucket}/study.db: the study database is a SQLite file")


def test_default_model_converts_a_gguf_into_a_bucket(gcs_bucket, tmp_path, capsys):
    gguf = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    target = f"{gcs_bucket}/models/tiny"
    status, _, err = run(["default-model", "--gguf", str(gguf), "--out", str(tmp_path / "tiny-hf")], capsys)
    assert status == 0, err
    status, out, err = run(["default-model", "--gguf", str(gguf), "--out", target], capsys)
    assert status == 0, err
    assert out == f"{target}\n" and "written in" in err
    assert storage.is_committed(target)
    remote = objects_under(target)
    assert remote.pop(storage.COMMIT_MARKER) == b""
    assert remote == files_under(tmp_path / "tiny-hf")
    assert not any(storage.BUILDING_INFIX in key for key in objects_under(f"{gcs_bucket}/models"))
    status, _, err = run(["default-model", "--gguf", str(gguf), "--out", target], capsys)
    assert status == 0 and "already present" in err


def test_data_download_installs_into_a_bucket(gcs_bucket, tmp_path, server, synthetic_tgz, capsys):
    data = f"{gcs_bucket}/data"
    status, _, err = run(["data", *cli_args(server, tmp_path / "local", synthetic_tgz, "--what", "personachat")], capsys)
    assert status == 0, err
    status, _, err = run(["data", *cli_args(server, data, synthetic_tgz, "--what", "personachat")], capsys)
    assert status == 0, err
    remote = objects_under(f"{data}/personachat")
    assert remote.pop(storage.COMMIT_MARKER) == b""
    assert remote == files_under(tmp_path / "local" / "personachat")
    assert objects_under(f"{data}/.downloads") == {"convai2_fix_723.tgz": synthetic_tgz}
    status, out, err = run(["data", *cli_args(server, data, synthetic_tgz, "--what", "personachat")], capsys)
    assert status == 0 and "personachat: already in" in out
    assert server.requests.count("/convai2.tgz") == 2  # the local install and the bucket's, not the rerun
