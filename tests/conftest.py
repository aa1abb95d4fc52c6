"""Shared test set-up.

Eight fake CPU devices are requested before JAX is imported anywhere, so sharding tests can build
meshes; single-device code simply runs on the first one.
"""

import os
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PDPO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The staged PersonaChat/DNLI files; absent in a user's clone, so tests that need them skip."""
    if not (SHARED_DATA / "personachat" / "valid_self_original_no_cands.txt").exists():
        pytest.skip(f"staged data not found at {SHARED_DATA} (set PDPO_SHARED_DATA to its folder)")
    return SHARED_DATA
