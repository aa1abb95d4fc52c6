"""`pdpo generate`: a persona + history answered by a tiny model matches PyTorch greedy decoding of
the same prompt; batched file input answers each conversation as it would alone; bad input names
its file and line; the bundled default model answers when it is installed."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from prefs_fixtures import tiny_llama_with_words

from pdpo_jax import cli
from pdpo_jax.errors import UsageError
from pdpo_jax.stages import generate as generate_cli

PERSONA = ["i love cats .", "i live in a small town ."]
CONVERSATIONS = [
    {"id": "a", "persona": PERSONA, "history": ["hi , do you have any pets ?"]},
    {"id": "b", "persona": ["i am a chef .", "i hate the cold ."], "history": []},
    {"id": "c", "persona": PERSONA, "history": ["hello !", "hi , how are you ?", "good . where do you live ?"]},
]
MAX_NEW = 6


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    texts = [s for c in CONVERSATIONS for s in (*c["persona"], *c["history"])] + ["your persona : system user assistant"]
    return tiny_llama_with_words(tmp_path_factory.mktemp("generate"), texts)


def torch_greedy_response(model_dir: Path, persona: list[str], history: list[str]) -> str:
    import torch
    import transformers

    from pdpo_jax.data.tokenization import PromptEncoder
    from pdpo_jax.generation import cut_at_stop

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    encoder = PromptEncoder(tokenizer, "chat-en")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt = torch.tensor([encoder.prompt_ids(persona, history)])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=MAX_NEW, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
    stops = [(tokenizer.eos_token_id,), tuple(encoder.end_of_turn_ids)]
    kept, _ = cut_at_stop(out[0, prompt.shape[1]:].tolist(), stops)
    return tokenizer.decode(kept, skip_special_tokens=True).strip()


def test_persona_and_history_in_response_out(tiny_model, capsys):
    argv = ["--model", str(tiny_model), "--persona", *PERSONA, "--history", CONVERSATIONS[0]["history"][0],
            "--max-new-tokens", str(MAX_NEW)]
    assert generate_cli.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].strip()
    assert printed[0] == torch_greedy_response(tiny_model, PERSONA, CONVERSATIONS[0]["history"])


def test_a_file_of_conversations_is_answered_as_each_alone(tiny_model, tmp_path, capsys):
    source, target = tmp_path / "talks.jsonl", tmp_path / "replies.jsonl"
    source.write_text("".join(json.dumps(c) + "\n" for c in CONVERSATIONS))
    common = ["--model", str(tiny_model), "--max-new-tokens", str(MAX_NEW)]
    assert generate_cli.main([*common, "--input", str(source), "--output", str(target), "--batch-size", "2"]) == 0
    replies = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["id"] for r in replies] == ["a", "b", "c"]
    for conversation, reply in zip(CONVERSATIONS, replies):
        assert reply["persona"] == conversation["persona"] and reply["history"] == conversation["history"]
        assert isinstance(reply["stopped"], bool)
        capsys.readouterr()
        alone = ["--persona", *conversation["persona"]] + (["--history", *conversation["history"]] if conversation["history"] else [])
        assert generate_cli.main([*common, *alone]) == 0
        assert capsys.readouterr().out.rstrip("\n") == reply["response"]


def test_sampling_is_reproducible_by_seed(tiny_model, capsys):
    argv = ["--model", str(tiny_model), "--persona", *PERSONA, "--sampler", "top_p", "--top-p", "0.95",
            "--max-new-tokens", str(MAX_NEW)]
    outputs = []
    for seed in ("1", "1", "2"):
        assert generate_cli.main([*argv, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


def test_bad_input_names_file_and_line(tiny_model, tmp_path, capsys):
    source = tmp_path / "talks.jsonl"
    source.write_text(json.dumps(CONVERSATIONS[0]) + "\n" + json.dumps({"persona": "not a list"}) + "\n")
    assert cli.main(["generate", "--model", str(tiny_model), "--input", str(source)]) == 2
    error = capsys.readouterr().err
    assert error == f"pdpo generate: {source}:2: 'persona' must be a list of strings\n"
    with pytest.raises(UsageError, match="either --input or --persona"):
        generate_cli.main(["--model", str(tiny_model), "--input", str(source), "--persona", "x"])


@pytest.mark.slow
def test_the_bundled_default_model_answers(capsys, bundled_gguf):
    if importlib.util.find_spec("pdpo_jax.model.default_model") is None:
        pytest.skip("pdpo_jax.model.default_model is not part of this checkout")
    from pdpo_jax.model.default_model import bundled_gguf_path

    try:
        bundled_gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    argv = ["--model", "default", "--persona", *PERSONA, "--history", "hi , do you have any pets ?",
            "--max-new-tokens", "12"]
    assert generate_cli.main(argv) == 0
    response = capsys.readouterr().out.strip()
    assert response and any(c.isalpha() for c in response)


def test_sampling_on_a_mesh_gives_the_one_device_response(tiny_model, capsys):
    argv = ["--model", str(tiny_model), "--persona", *PERSONA, "--history", CONVERSATIONS[0]["history"][0],
            "--max-new-tokens", str(MAX_NEW), "--sampler", "top_p", "--seed", "4"]
    assert generate_cli.main(argv) == 0
    single = capsys.readouterr().out
    assert single.strip()
    assert generate_cli.main([*argv, "--mesh", "data=2,fsdp=2,tensor=2"]) == 0
    assert capsys.readouterr().out == single


def test_a_malformed_mesh_flag_is_named():
    with pytest.raises(UsageError, match="--mesh 'data=two'"):
        generate_cli.main(["--persona", "x", "--mesh", "data=two"])
