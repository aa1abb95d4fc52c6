"""Models named by a Hugging Face Hub id (`meta-llama/Llama-2-13b-hf`, as the paper configs name
them): fetched once into the Hub cache (`HF_HOME` / `HF_HUB_CACHE`), then loaded from that folder
like any model directory.

Only what loading reads is fetched: configs, tokenizer files and safetensors weights, or the
PyTorch / Flax weights of a repository that has no safetensors. On a pod, process 0 fetches
first and the other hosts after it, so a cache on the shared run folder is filled once.
"""

from __future__ import annotations

import re
from pathlib import Path

from pdpo_jax.errors import ModelDirError
from pdpo_jax.parallel import is_primary, primary_decides

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")
CONFIG_AND_TOKENIZER = ["*.json", "*.model", "*.txt", "*.jinja", "*.tiktoken", "tokenizer*"]
SAFETENSORS = ["*.safetensors"]
OTHER_WEIGHTS = ["*.bin", "*.msgpack"]


def looks_like_hub_id(name: str) -> bool:
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=CONFIG_AND_TOKENIZER + SAFETENSORS))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=CONFIG_AND_TOKENIZER + OTHER_WEIGHTS))
    except Exception as error:  # offline, unknown id, gated model without a token, ...
        raise ModelDirError(
            f"{repo_id}: no such directory here, and the Hugging Face Hub could not provide it "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no detail'}); "
            f"download it first (`hf download {repo_id}`, with a token for gated models) or give its folder"
        ) from None
    return folder


def hub_model_dir(repo_id: str) -> Path:
    """The local folder of the Hub model `repo_id`, fetched into the Hub cache if it is not there."""
    folder = Path(primary_decides(lambda: str(_download(repo_id))))
    return folder if is_primary() else _download(repo_id)
