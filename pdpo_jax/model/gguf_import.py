"""Turn a llama-architecture GGUF file into an ordinary Hugging Face model directory.

The directory holds `config.json`, `generation_config.json`, fp32 `model.safetensors` and a
byte-level BPE tokenizer (`tokenizer.json`, `tokenizer_config.json`, chat template), so every
other part of the project loads it like any model from the Hub. Only numpy and `gguf` touch the
weights; transformers is used for the config and tokenizer files alone.

Two things in a GGUF differ from the Hugging Face layout:

* llama.cpp's converter permutes the rows of q_proj and k_proj from the Hugging Face
  "rotate half" RoPE order to its interleaved pair order; `unpermute_rotary_rows` undoes it.
* The tokenizer is stored as metadata (tokens, merges, token types, special ids, the name of the
  pre-tokenizer) and has to be rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pdpo_jax.errors import PdpoError
from pdpo_jax.model.family import GgufNames, family_of_gguf_architecture, gguf_architectures
from pdpo_jax.object_store import as_path, is_object_store
from pdpo_jax.storage import commit_directory, is_committed

# Written last into a converted directory; its presence means the directory is complete.
COMPLETE_MARKER = "gguf_source.json"
# Bumped whenever the conversion changes what it writes, so stale caches are rebuilt.
CONVERSION_VERSION = 1

# llama.cpp token types (llama_token_type).
_CONTROL_TOKEN = 3
_USER_DEFINED_TOKEN = 4

# `tokenizer.ggml.pre` -> whether numeric characters are split off one by one before the GPT-2
# regex, as llama.cpp does for these pre-tokenizers (and as SmolLM2's own tokenizer.json does
# with `Digits(individual_digits=True)`).
_BYTE_LEVEL_PRE_TOKENIZERS = {
    "default": False,
    "gpt2": False,
    "smollm": True,
    "starcoder": True,
    "refact": True,
}

class GGUFImportError(PdpoError):
    """A GGUF file that cannot be turned into a Hugging Face directory; the message names it."""


@dataclass(frozen=True)
class LlamaShape:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    context_length: int
    rms_norm_eps: float
    rope_theta: float


def gguf_to_hf_dir(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, replace: bool = False) -> Path:
    """Convert `gguf_path` into a new Hugging Face directory at `out_dir` and return its path.

    The directory is built beside `out_dir` and renamed into place
    (`pdpo_jax.storage.commit_directory`), so `out_dir` is either absent or complete. An existing `out_dir` raises `FileExistsError` (so does
    another writer renaming its directory into place first, as an `OSError`), unless `replace`.
    On gs:// it is built in a local folder and published with its COMMITTED marker last.
    """
    gguf_path, out_dir = Path(gguf_path), as_path(out_dir)
    there = is_committed(out_dir) if is_object_store(out_dir) else out_dir.exists()
    if there and not replace:
        raise FileExistsError(f"{out_dir} already exists")
    reader = open_gguf(gguf_path)
    with commit_directory(out_dir, replace=replace, local_staging=True) as building:
        write_hf_files(reader, gguf_path, building)
    return out_dir


def write_hf_files(reader: Any, gguf_path: Path, out_dir: Path) -> None:
    """Write every file of the Hugging Face directory into `out_dir`, the completion marker last."""
    from safetensors.numpy import save_file

    metadata = read_metadata(reader)
    architecture = metadata.get("general.architecture")
    family = family_of_gguf_architecture(architecture)
    if family is None:
        raise GGUFImportError(
            f"{gguf_path}: unsupported architecture {architecture!r} in general.architecture "
            f"(supported: {', '.join(gguf_architectures())})"
        )
    shape = llama_shape(metadata, gguf_path)
    weights = hf_weights(reader, shape, family.gguf, gguf_path)
    tied = "lm_head.weight" not in weights
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    write_config(metadata, shape, tied, out_dir)
    write_tokenizer(metadata, shape, gguf_path, out_dir)
    marker = {
        "conversion_version": CONVERSION_VERSION,
        "gguf_file": gguf_path.name,
        "gguf_bytes": gguf_path.stat().st_size,
        "gguf_sha256": file_sha256(gguf_path),
        "general.name": metadata.get("general.name"),
    }
    (out_dir / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")


def open_gguf(gguf_path: Path) -> Any:
    """`gguf.GGUFReader` over the file, with any failure reported against the file's path."""
    import gguf

    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    try:
        return gguf.GGUFReader(gguf_path)
    except Exception as err:  # the reader raises bare ValueError/IndexError/struct errors
        raise GGUFImportError(
            f"{gguf_path}: not a readable GGUF file; it is truncated, corrupt or not GGUF ({type(err).__name__}: {err})"
        ) from err


def read_metadata(reader: Any) -> dict[str, Any]:
    """Every key/value field of the file as plain Python values (lists for arrays)."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def llama_shape(metadata: dict[str, Any], gguf_path: Path) -> LlamaShape:
    arch = metadata["general.architecture"]

    def required(key: str) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            raise GGUFImportError(f"{gguf_path}: metadata key {full!r} is missing")
        return metadata[full]

    unsupported = [k for k in metadata if k.startswith(f"{arch}.rope.scaling.")]
    if unsupported:
        raise GGUFImportError(f"{gguf_path}: RoPE scaling ({unsupported[0]}) is not supported")
    hidden = int(required("embedding_length"))
    heads = int(required("attention.head_count"))
    head_dim = int(metadata.get(f"{arch}.attention.key_length", hidden // heads))
    rotary_dim = int(metadata.get(f"{arch}.rope.dimension_count", head_dim))
    if rotary_dim != head_dim:
        raise GGUFImportError(f"{gguf_path}: partial rotary embeddings ({rotary_dim} of {head_dim}) are not supported")
    tokens = metadata.get("tokenizer.ggml.tokens")
    vocab = int(metadata.get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    return LlamaShape(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(required("feed_forward_length")),
        num_layers=int(required("block_count")),
        num_heads=heads,
        num_kv_heads=int(metadata.get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=head_dim,
        context_length=int(required("context_length")),
        rms_norm_eps=float32_as_written(required("attention.layer_norm_rms_epsilon")),
        rope_theta=float32_as_written(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
    )


def float32_as_written(value: float) -> float:
    """The shortest decimal that round-trips through float32: GGUF stores 1e-5 as 9.9999997e-06."""
    return float(str(np.float32(value)))


def _gguf_stem(gguf_name: str) -> tuple[str, int | None] | None:
    """("blk.{i}.attn_q", 3) for "blk.3.attn_q.weight", ("token_embd", None) for "token_embd.weight"."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix != "weight":
        return None
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
        return f"blk.{{i}}.{parts[2]}", int(parts[1])
    return stem, None


def hf_name(gguf_name: str, names: GgufNames) -> str | None:
    """The Hugging Face parameter name of a GGUF tensor, or None when there is none."""
    stem = _gguf_stem(gguf_name)
    if stem is None or stem[0] not in names.tensors:
        return None
    template, layer = stem
    return names.tensors[template].format(i=layer) + ".weight"


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation.

    Per head, llama.cpp stores the rows as interleaved pairs (x0, x_half, x1, x_half+1, ...);
    Hugging Face Llama expects the first half then the second half ("rotate half").
    """
    rows, cols = weight.shape
    return weight.reshape(num_heads, rows // num_heads // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def hf_weights(reader: Any, shape: LlamaShape, names: GgufNames, gguf_path: Path) -> dict[str, np.ndarray]:
    """Every tensor dequantized to fp32, renamed and un-permuted into Hugging Face Llama layout."""
    from gguf.quants import dequantize

    weights: dict[str, np.ndarray] = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name, names)
        if name is None:
            raise GGUFImportError(f"{gguf_path}: tensor {tensor.name!r} has no Hugging Face Llama counterpart")
        expected = tuple(int(d) for d in reversed(tensor.shape))
        try:
            array = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(expected)
        except Exception as err:
            raise GGUFImportError(
                f"{gguf_path}: tensor {tensor.name!r} ({tensor.tensor_type.name}, shape {expected}) "
                f"cannot be dequantized ({type(err).__name__}: {err})"
            ) from err
        heads_field = names.rotary_rows.get(_gguf_stem(tensor.name)[0])
        if heads_field is not None:
            array = unpermute_rotary_rows(array, getattr(shape, heads_field))
        weights[name] = np.ascontiguousarray(array)
    check_complete(weights, shape, gguf_path)
    return weights


def check_complete(weights: dict[str, np.ndarray], shape: LlamaShape, gguf_path: Path) -> None:
    q_rows, kv_rows = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    expected = {
        "model.embed_tokens.weight": (shape.vocab_size, shape.hidden_size),
        "model.norm.weight": (shape.hidden_size,),
    }
    for i in range(shape.num_layers):
        prefix = f"model.layers.{i}."
        expected |= {
            prefix + "self_attn.q_proj.weight": (q_rows, shape.hidden_size),
            prefix + "self_attn.k_proj.weight": (kv_rows, shape.hidden_size),
            prefix + "self_attn.v_proj.weight": (kv_rows, shape.hidden_size),
            prefix + "self_attn.o_proj.weight": (shape.hidden_size, q_rows),
            prefix + "mlp.gate_proj.weight": (shape.intermediate_size, shape.hidden_size),
            prefix + "mlp.up_proj.weight": (shape.intermediate_size, shape.hidden_size),
            prefix + "mlp.down_proj.weight": (shape.hidden_size, shape.intermediate_size),
            prefix + "input_layernorm.weight": (shape.hidden_size,),
            prefix + "post_attention_layernorm.weight": (shape.hidden_size,),
        }
    if "lm_head.weight" in weights:
        expected["lm_head.weight"] = (shape.vocab_size, shape.hidden_size)
    for name, want in expected.items():
        if name not in weights:
            raise GGUFImportError(f"{gguf_path}: tensor for {name} is missing")
        if weights[name].shape != want:
            raise GGUFImportError(f"{gguf_path}: {name} has shape {weights[name].shape}, metadata implies {want}")
    extra = sorted(set(weights) - set(expected))
    if extra:
        raise GGUFImportError(f"{gguf_path}: unexpected tensor {extra[0]} for a {shape.num_layers}-layer model")


def llama_config(shape: LlamaShape, tied: bool, special: dict[str, int]) -> dict[str, Any]:
    """`config.json` as transformers 5 writes a `LlamaConfig` (RoPE theta under `rope_parameters`).

    Spelled out rather than built with `LlamaConfig`, whose module imports torch when it is installed.
    """
    import transformers

    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": special.get("bos"),
        "dtype": "float32",
        "eos_token_id": special.get("eos"),
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.context_length,
        "mlp_bias": False,
        "model_type": "llama",
        "num_attention_heads": shape.num_heads,
        "num_hidden_layers": shape.num_layers,
        "num_key_value_heads": shape.num_kv_heads,
        "pad_token_id": special.get("pad"),
        "pretraining_tp": 1,
        "rms_norm_eps": shape.rms_norm_eps,
        "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": tied,
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "vocab_size": shape.vocab_size,
    }


def write_config(metadata: dict[str, Any], shape: LlamaShape, tied: bool, out_dir: Path) -> None:
    from transformers import GenerationConfig

    special = special_token_ids(metadata)
    config = llama_config(shape, tied, special)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    GenerationConfig(
        bos_token_id=special.get("bos"), eos_token_id=special.get("eos"), pad_token_id=special.get("pad")
    ).save_pretrained(out_dir)


def special_token_ids(metadata: dict[str, Any]) -> dict[str, int]:
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    return {
        role: int(metadata[f"tokenizer.ggml.{key}"]) for role, key in keys.items() if f"tokenizer.ggml.{key}" in metadata
    }


def build_tokenizer(metadata: dict[str, Any], gguf_path: Path) -> Any:
    """A `tokenizers.Tokenizer` equal to the byte-level BPE the GGUF metadata describes."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFImportError(f"{gguf_path}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE 'gpt2')")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BYTE_LEVEL_PRE_TOKENIZERS:
        raise GGUFImportError(
            f"{gguf_path}: tokenizer.ggml.pre {pre!r} is not supported (supported: {', '.join(_BYTE_LEVEL_PRE_TOKENIZERS)})"
        )
    tokens = list(metadata["tokenizer.ggml.tokens"])
    token_types = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = []
    for line_no, merge in enumerate(metadata.get("tokenizer.ggml.merges") or []):
        pair = merge.split(" ")
        if len(pair) != 2:
            raise GGUFImportError(f"{gguf_path}: tokenizer.ggml.merges[{line_no}] = {merge!r} is not a pair")
        merges.append((pair[0], pair[1]))
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{gguf_path}: tokenizer.ggml.tokens contains duplicate tokens")

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if _BYTE_LEVEL_PRE_TOKENIZERS[pre]:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED_TOKEN]
    )
    return tokenizer


def write_tokenizer(metadata: dict[str, Any], shape: LlamaShape, gguf_path: Path, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    tokens = metadata["tokenizer.ggml.tokens"]
    named = {f"{role}_token": tokens[index] for role, index in special_token_ids(metadata).items()}
    kwargs: dict[str, Any] = dict(
        tokenizer_object=build_tokenizer(metadata, gguf_path),
        model_max_length=shape.context_length,
        clean_up_tokenization_spaces=False,
        add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        **named,
    )
    if "tokenizer.chat_template" in metadata:
        kwargs["chat_template"] = metadata["tokenizer.chat_template"]
    PreTrainedTokenizerFast(**kwargs).save_pretrained(out_dir)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def make_sibling_dir(path: Path, purpose: str) -> Path:
    """A new, uniquely named, hidden directory next to `path` (created with the user's umask)."""
    while True:
        candidate = path.parent / f".{path.name}.{purpose}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue


def discard_dir(path: Path) -> None:
    """Move `path` out of the way (one atomic rename), then delete it."""
    trash = make_sibling_dir(path, "old")
    try:
        os.rename(path, trash / path.name)
    except FileNotFoundError:
        pass  # someone else removed it first
    shutil.rmtree(trash, ignore_errors=True)
