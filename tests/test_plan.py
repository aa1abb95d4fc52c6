"""`pdpo plan`: the paper configs compile for their TPU slices with the TPU compiler (libtpu, no
TPU), an undersized layout is refused with its figures, and the arithmetic and facts under it.

Compiling a paper model's train step takes minutes on a CPU, so the suite compiles the full plan of
one small paper model (gpt2-medium, all but its DPO step), the largest program of the largest one
(llama-2-13b's SFT step) and every program of a tiny local model; docs/pods.md holds the plans of
all paper configs.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from pdpo_jax import cli
from pdpo_jax.config import load_config
from pdpo_jax.errors import ModelDirError
from pdpo_jax.model.architectures import architecture_of, known_architectures, published_config
from pdpo_jax.model.decoder import param_shapes
from pdpo_jax.planning.epochs import PERSONACHAT_TRAIN, epoch_sizes
from pdpo_jax.planning.roofline import Cost, Memory, roofline_seconds, steps_per_epoch
from pdpo_jax.planning.slices import CHIPS, SliceError, parse_slice, slice_of_config_comment

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"
PAPER_CONFIGS = sorted(p for p in PAPER.glob("*.yaml") if not p.name.startswith("_"))
GiB = 1024**3

def parameter_count(config) -> int:
    return int(sum(np.prod(leaf.shape) for leaf in jax.tree.leaves(param_shapes(config))))


def run_plan(argv: list[str], capsys) -> tuple[int, dict | None, str]:
    status = cli.main(["plan", *argv, "--json"])
    out, err = capsys.readouterr()
    return status, (json.loads(out) if out.strip() else None), err


# --- arithmetic ------------------------------------------------------------------------------------


def test_memory_total_counts_aliased_outputs_once():
    memory = Memory(argument=10, output=8, alias=6, temp=5, resident=2)
    assert memory.total == 10 + 8 - 6 + 5 + 2
    assert memory.as_dict()["total"] == memory.total


def test_roofline_takes_the_slower_of_compute_and_memory():
    chip = CHIPS["v4"]
    compute_bound = Cost(flops=275e12, bytes_accessed=1.2e9)  # 1 s of FLOPs, 1 ms of bytes
    memory_bound = Cost(flops=275e9, bytes_accessed=2.4e12)  # 1 ms of FLOPs, 2 s of bytes
    assert roofline_seconds(compute_bound, chip.peak_flops, chip.hbm_bandwidth) == pytest.approx(1.0)
    assert roofline_seconds(memory_bound, chip.peak_flops, chip.hbm_bandwidth) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        roofline_seconds(compute_bound, 0.0, 1.0)


def test_a_loop_body_counted_once_is_repeated_around_what_lies_outside():
    reported = Cost(flops=110.0, bytes_accessed=30.0)  # outside (10, 10) + one body (100, 20)
    outside = Cost(flops=10.0, bytes_accessed=10.0)
    total = reported.repeated_body(outside, trips=4)
    assert (total.flops, total.bytes_accessed) == (410.0, 90.0)


def test_steps_per_epoch_counts_the_short_last_step():
    assert steps_per_epoch(65719, 16) == 4108
    assert steps_per_epoch(32, 16) == 2
    with pytest.raises(ValueError):
        steps_per_epoch(10, 0)


# --- slices ----------------------------------------------------------------------------------------


def test_slice_names_map_to_chips_and_topologies():
    v4 = parse_slice("v4-32")
    assert (v4.chips, v4.hosts, v4.topology_name, v4.chip_config_name) == (16, 4, "v4:2x2x4", "megacore")
    assert parse_slice("v5p-16").topology_name == "v5:2x2x2"
    v5e = parse_slice("v5litepod-8")
    assert (v5e.name, v5e.chips, v5e.topology_name, v5e.chip_config_name) == ("v5e-8", 8, "v5e:2x4", "default")
    assert parse_slice("v6e-1").chips_per_host_bounds == (1, 1, 1)
    for bad in ("v4", "v4-6", "tpu-32", "v5e-3"):
        with pytest.raises(SliceError):
            parse_slice(bad)


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_config_names_a_slice_its_mesh_fills(config):
    name = slice_of_config_comment(config.read_text(encoding="utf-8").splitlines()[0])
    tpu = parse_slice(name)
    run = load_config(config)
    assert run.mesh.data * run.mesh.fsdp * run.mesh.tensor == tpu.chips, (config.name, name)


def test_a_v4_slice_is_planned_with_one_device_per_chip(tpu_compiler):
    from pdpo_jax.planning.slices import topology_devices

    devices = topology_devices(parse_slice("v4-32"))
    assert len(devices) == 16  # megacore: without it libtpu lists 32 single-TensorCore devices
    assert {d.platform for d in devices} == {"tpu"}
    assert jax.default_backend() == "cpu"  # JAX_PLATFORMS=cpu still holds for everything else


# --- architecture facts ------------------------------------------------------------------------------


PUBLISHED_SIZES = {  # parameters as the model cards state them
    "meta-llama/Llama-2-13b-hf": 13.0e9, "meta-llama/Llama-2-7b-hf": 6.74e9, "mistralai/Mistral-7B-v0.1": 7.24e9,
    "Qwen/Qwen2-7B": 7.6e9, "Qwen/Qwen2-1.5B": 1.54e9, "openai-community/gpt2-medium": 355e6,
    "rinna/japanese-gpt-1b": 1.3e9, "rinna/japanese-gpt2-medium": 336e6, "tokyotech-llm/Swallow-7b-hf": 6.83e9,
    "tokyotech-llm/Swallow-13b-hf": 13.1e9, "sbintuitions/sarashina2-7b": 7.3e9, "sbintuitions/sarashina2-13b": 13.7e9,
}


@pytest.mark.parametrize("config", PAPER_CONFIGS, ids=lambda p: p.stem)
def test_every_paper_model_has_published_facts_with_its_parameter_count(config):
    path = load_config(config).model.path
    model, source = architecture_of(path)
    assert "shipped with pdpo_jax" in source
    assert parameter_count(model) == pytest.approx(PUBLISHED_SIZES[path], rel=0.02)
    assert published_config(path)["_provenance"]["hub_id"] == path


def test_facts_name_exactly_the_paper_models():
    assert set(known_architectures()) == set(PUBLISHED_SIZES)


def test_llama_2_13b_and_gpt2_medium_sizes():
    assert parameter_count(architecture_of("meta-llama/Llama-2-13b-hf")[0]) == pytest.approx(13.0e9, rel=0.005)
    assert parameter_count(architecture_of("openai-community/gpt2-medium")[0]) == pytest.approx(355e6, rel=0.005)


def test_a_local_model_directory_wins_and_an_unknown_hub_id_is_named(tmp_path):
    facts = published_config("Qwen/Qwen2-1.5B") | {"num_hidden_layers": 2}
    (tmp_path / "config.json").write_text(json.dumps(facts))
    model, source = architecture_of(tmp_path)
    assert model.num_layers == 2 and source.endswith("config.json")
    with pytest.raises(ModelDirError, match="someone/unknown-model"):
        architecture_of("someone/unknown-model")


# --- epoch sizes ----------------------------------------------------------------------------------


def test_epoch_sizes_come_from_files_or_say_what_they_assume(shared_data, tmp_path):
    english = load_config(PAPER / "gpt2-medium.yaml")
    sizes = epoch_sizes(english)
    assert sizes.train_examples == PERSONACHAT_TRAIN["examples"] and "published size" in sizes.source
    japanese = epoch_sizes(load_config(PAPER / "japanese-gpt2-medium.yaml"))
    assert "assumed from JPersonaChat" in japanese.source and japanese.train_examples == round(61793 / 2 * 0.8)
    valid = shared_data / "personachat" / "valid_self_original_no_cands.txt"
    counted = epoch_sizes(load_config(PAPER / "gpt2-medium.yaml", [f"data.train=[{valid}]", "data.val=[]",
                                                                      "data.exclude_dnli=[]"]))
    assert "counted in data.train" in counted.source
    assert 0.7 * 7801 < counted.train_examples < 7801  # the 0.8 train split of 7,801 turns
    assert epoch_sizes(english, examples=100).train_examples == 100


# --- compiled plans --------------------------------------------------------------------------------


def tiny_model(tmp_path: Path, layers: int = 2) -> Path:
    config = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": layers,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1024,
              "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


LOCAL_PLAN_ARGS = ["--config", str(PAPER / "gpt2-medium.yaml"), "--topology", "v4-8", "mesh.data=2", "mesh.fsdp=2",
                   "mesh.tensor=1"]


@pytest.fixture(scope="module")
def local_model(tmp_path_factory) -> Path:
    # more layers than the cost probes of a scanned stack have (1 and 2), so their extrapolation shows;
    # no more, as the unrolled cross-check compiles every layer
    return tiny_model(tmp_path_factory.mktemp("plan-model"), layers=3)


def test_every_program_of_a_local_model_compiles_on_a_two_axis_mesh(local_model, capsys, tpu_compiler):
    status, plan, err = run_plan([*LOCAL_PLAN_ARGS, f"model.path={local_model}"], capsys)
    assert status == 0, err
    assert plan["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and plan["fits"]
    assert plan["model"]["scan_layers"]  # as the paper configs run
    assert [p["name"] for p in plan["programs"]] == ["sft-step", "dpo-step", "prefill", "decode-step", "dnli-score"]
    for program in plan["programs"]:
        memory = program["memory"]
        assert memory["total"] == memory["argument"] + memory["output"] - memory["alias"] + memory["temp"] + memory["resident"]
        assert program["flops"] > 0 and program["seconds"] > 0
    stages = {e["stage"]: e for e in plan["epochs"]}
    assert set(stages) == {"sft", "make-prefs", "dpo", "eval-dnli"}
    assert stages["sft"]["steps"] == steps_per_epoch(PERSONACHAT_TRAIN["examples"], 16)
    assert stages["sft"]["epoch_seconds"] == pytest.approx(stages["sft"]["steps"] * stages["sft"]["step_seconds"])

    # The scanned stack is counted as the unrolled one is (the compiler counts a loop body once).
    status, unrolled, err = run_plan([*LOCAL_PLAN_ARGS, f"model.path={local_model}", "model.scan_layers=false",
                                      "--programs", "sft-step,decode-step"], capsys)
    assert status == 0, err
    scanned = {p["name"]: p["flops"] for p in plan["programs"]}
    for program in unrolled["programs"]:
        assert scanned[program["name"]] == pytest.approx(program["flops"], rel=1e-3), program["name"]


def test_a_program_planned_before_is_read_back_not_compiled(local_model, capsys, monkeypatch, tmp_path, tpu_compiler):
    monkeypatch.setenv("PDPO_CACHE_DIR", str(tmp_path))
    args = [*LOCAL_PLAN_ARGS, f"model.path={local_model}", "--programs", "decode-step"]
    status, first, err = run_plan(args, capsys)
    assert status == 0, err
    assert not first["programs"][0]["kept_from_earlier_plan"]
    assert len(list((tmp_path / "plan-analyses").glob("*.json"))) == 3  # the scanned step and its two probes

    def compile_refused(*args, **kwargs):
        raise AssertionError("a program planned before was compiled again")

    monkeypatch.setattr(jax.stages.Lowered, "compile", compile_refused)
    status, second, err = run_plan(args, capsys)
    assert status == 0, err
    assert second["programs"][0].pop("kept_from_earlier_plan")
    first["programs"][0].pop("kept_from_earlier_plan")
    assert second == first  # the same figures, compile seconds included (those of the compiles they come from)
    cli.main(["plan", *args])
    assert "kept from an earlier plan" in capsys.readouterr().out


def test_a_kept_analysis_is_keyed_by_the_program_its_devices_and_the_compilers(tmp_path, monkeypatch):
    from pdpo_jax.planning import analyses

    on = [jax.sharding.SingleDeviceSharding(device) for device in jax.devices()[:2]]
    x = jax.ShapeDtypeStruct((4,), np.float32, sharding=on[0])
    double = jax.jit(lambda v: v * 2)
    key = analyses.analysis_key(double.lower(x), (x,))
    assert key == analyses.analysis_key(double.lower(x), (x,))
    others = [(double, jax.ShapeDtypeStruct((8,), np.float32, sharding=on[0])),  # another shape
              (jax.jit(lambda v: v * 3), x),  # another program
              (double, jax.ShapeDtypeStruct((4,), np.float32, sharding=on[1]))]  # another device
    assert len({key, *(analyses.analysis_key(f.lower(a), (a,)) for f, a in others)}) == 4
    monkeypatch.setattr(analyses, "_version", lambda package: "another")
    assert analyses.analysis_key(double.lower(x), (x,)) != key

    monkeypatch.setenv("PDPO_CACHE_DIR", str(tmp_path))
    kept = analyses.Analysis({"argument": 1, "output": 2, "alias": 0, "temp": 3}, {"flops": 4.0, "bytes_accessed": 5.0},
                             6, 7.5)
    analyses.save(key, kept)
    assert analyses.load(key) == dataclasses.replace(kept, kept=True)
    monkeypatch.setenv(analyses.CACHE_SWITCH_ENV, "0")
    assert analyses.load(key) is None


@pytest.fixture(scope="module")
def gpt2_medium_plan(tpu_compiler):
    from pdpo_jax.planning.report import plan_run

    # The train step and the sampler's step; the others (a minute or two more) are compiled by the
    # tiny model's plan, and docs/pods.md has every program of gpt2-medium.
    return plan_run(load_config(PAPER / "gpt2-medium.yaml"), parse_slice("v4-8"), config_name="gpt2-medium.yaml",
                    programs=("sft-step", "decode-step"))


@pytest.mark.slow
def test_gpt2_medium_fits_its_v4_8(gpt2_medium_plan):
    plan = gpt2_medium_plan
    assert plan["fits"] and plan["slice"]["chips"] == 4 and plan["mesh"]["data"] == 4
    programs = {p["name"]: p for p in plan["programs"]}
    assert set(programs) == {"sft-step", "decode-step"}
    assert all(p["need_bytes"] <= 32 * GiB for p in programs.values())
    # Pure data parallel: every chip holds the fp32 weights and both Adam moments.
    params = plan["model"]["parameters"]
    assert programs["sft-step"]["memory"]["argument"] == pytest.approx(12 * params, rel=0.02)
    # The micro-batch loop is counted in full: a remat train step costs about 8 FLOPs per parameter
    # and token (forward, forward again, backward); a chip sees 4 micro-batches of 1 x 512 tokens.
    tokens = 4 * 1 * 512
    assert programs["sft-step"]["flops"] == pytest.approx(8 * params * tokens, rel=0.35)


@pytest.mark.slow
def test_llama_2_13b_sft_step_fits_its_v4_32(capsys, tpu_compiler):
    status, plan, err = run_plan(["--config", str(PAPER / "llama-2-13b.yaml"), "--programs", "sft-step"], capsys)
    assert status == 0, err
    assert plan["slice"]["name"] == "v4-32" and plan["slice"]["chips"] == 16
    assert plan["mesh"] == {"data": 1, "fsdp": 4, "tensor": 4}
    (sft,) = plan["programs"]
    assert sft["fits"] and sft["need_bytes"] < 32 * GiB
    # fp32 weights + two Adam moments split over all 16 chips
    assert sft["memory"]["argument"] == pytest.approx(12 * plan["model"]["parameters"] / 16, rel=0.02)
    # The scanned stack's cost comes from its unrolled 1- and 2-layer probes: all 40 layers counted,
    # about 8 FLOPs per parameter and token (remat), 4 micro-batches of 1 row a data shard, the
    # weights split 4 ways by tensor.
    assert plan["model"]["scan_layers"]
    assert sft["flops"] == pytest.approx(8 * plan["model"]["parameters"] * 4 * 512 / 4, rel=0.35)
    # at least the weights, their gradients and both Adam moments go through HBM once a step
    assert sft["bytes_accessed"] > sft["memory"]["argument"]


def test_an_undersized_mesh_is_refused_with_its_figures(capsys, tpu_compiler):
    status, plan, err = run_plan(["--config", str(PAPER / "llama-2-13b.yaml"), "--topology", "v4-8",
                                  "--programs", "sft-step", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=1"], capsys)
    assert status == 2
    assert plan is not None and not plan["fits"]
    assert err.count("\n") == 1 and err.startswith("pdpo plan: ")
    for fragment in ("sft-step", "v4-8", "GiB per chip", "32.00 GiB of HBM"):
        assert fragment in err, err
    (sft,) = plan["programs"]
    assert sft["need_bytes"] == pytest.approx(12 * plan["model"]["parameters"] / 4, rel=0.02)


def test_plan_help_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["plan", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for fragment in ("--config", "--topology", "libtpu", "HBM", "model.path"):
        assert fragment in out


def test_plan_without_a_slice_or_with_a_bad_one_is_one_line(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"base: {PAPER / '_english.yaml'}\nmodel: {{path: meta-llama/Llama-2-7b-hf}}\n")
    assert cli.main(["plan", "--config", str(config)]) == 2
    assert "give --topology" in capsys.readouterr().err
    assert cli.main(["plan", "--config", str(config), "--topology", "v9-8"]) == 2
    assert "v9-8" in capsys.readouterr().err
