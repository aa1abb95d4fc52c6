"""A digest of what defines a model: its architecture and its weights, however they were saved.

Two directories get the same digest exactly when they hold the same model: the architecture read
from `config.json` (every field of `ModelConfig` except the run-time compute dtype and
rematerialization and layer layout) and every parameter by name, shape, dtype and bytes, in name order. File
layout, orbax metadata, shard sizes and modification times do not enter, so a model saved twice,
copied, or exported to safetensors keeps its digest; a retrained one gets another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json

import numpy as np

from pdpo_jax.model.layer_stack import per_layer_leaves
from pdpo_jax.model.loader import Model
from pdpo_jax.parallel import to_host

DIGEST_PREFIX = "sha256:"


def architecture_json(model: Model) -> str:
    fields = dataclasses.asdict(model.config.replace(dtype="float32", remat=False, scan_layers=False))
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=list)


def model_digest(model: Model) -> str:
    """`sha256:<hex>` of the model's architecture and parameters (see the module docstring)."""
    digest = hashlib.sha256(b"pdpo-model\x00" + architecture_json(model).encode() + b"\x00")
    leaves = per_layer_leaves(model.params)  # the per-layer names, also for a scanned run's stacked layers
    for name in sorted(leaves):
        array = np.ascontiguousarray(to_host(leaves[name].value()))  # gathered one tensor at a time on a pod
        header = f"{name}\x00{array.dtype.str}\x00{','.join(map(str, array.shape))}\x00"
        digest.update(header.encode())
        digest.update(array.tobytes())
    return DIGEST_PREFIX + digest.hexdigest()
