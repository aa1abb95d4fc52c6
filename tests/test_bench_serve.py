"""bench_serve's FLOP count, by hand on a tiny Llama: the figure that says how close each server
comes to the machine's matmul rate."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from model_fixtures import make_tiny_hf_model
from pdpo_jax.model.checkpoint import read_config

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_serve.py"


def test_model_flops_count_the_blocks_per_prompt_token_and_add_the_unembedding_per_generated_one(tmp_path):
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_dir = make_tiny_hf_model(tmp_path, "llama")
    c = json.loads((model_dir / "config.json").read_text())
    h, layers, inner, vocab = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    head_dim = h // c["num_attention_heads"]
    attention = 2 * h * c["num_attention_heads"] * head_dim + 2 * h * c["num_key_value_heads"] * head_dim
    blocks = layers * (attention + 3 * h * inner + 2 * h) + h  # two norms a block, the final norm
    assert not c.get("tie_word_embeddings")  # its own lm_head: not a block parameter
    assert bench.model_flops(read_config(model_dir)) == (2 * blocks, 2 * (blocks + vocab * h))


def test_distinct_requests_differ_from_their_first_token_and_keep_the_rest():
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    messages = [{"role": "system", "content": "persona"}, {"role": "user", "content": "hi"}]
    first, second = bench.tagged(messages, 1), bench.tagged(messages, 2)
    assert first[0]["content"] == "[request 000001] persona" and second[0]["content"].startswith("[request 000002]")
    assert first[1:] == second[1:] == messages[1:]
    assert messages[0]["content"] == "persona"  # the config's prompts are left as they were


def test_prefill_together_reports_both_times_and_the_exactness_check(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_serve", SCRIPT)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    model_dir = make_tiny_hf_model(tmp_path, "llama")
    bench.prefill_together(model_dir, [2], width=16, shortest=12, repeats=1)
    line = capsys.readouterr().out.strip()
    assert line.startswith("prefill 2 prompts of width 16: one at a time")
    assert line.endswith(("bit-identical both ways: True", "bit-identical both ways: False"))
