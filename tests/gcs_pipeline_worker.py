"""One process of the two-process `pdpo pipeline` run on gs:// in test_multihost_pipeline.py (run as
a script, not collected): `pdpo` itself, with every object this process uploads or copies
through gcsfs under PDPO_TEST_WATCH (a gs:// folder) listed, one per line, in PDPO_TEST_WRITES.
Orbax's array data goes through tensorstore, not gcsfs, and is not listed."""

from __future__ import annotations

import os
import sys

WATCHED = os.environ["PDPO_TEST_WATCH"].removeprefix("gs://").rstrip("/") + "/"
WRITES = open(os.environ["PDPO_TEST_WRITES"], "w", buffering=1)


def record(event: str, bucket: str, key: str) -> None:
    name = f"{bucket}/{key}"
    if name.startswith(WATCHED):
        WRITES.write(f"{event}\tgs://{name}\n")


def patch_gcsfs() -> None:
    import gcsfs.core

    simple_upload, initiate_upload = gcsfs.core.simple_upload, gcsfs.core.initiate_upload
    copy = gcsfs.core.GCSFileSystem._cp_file

    async def recorded_simple_upload(fs, bucket, key, *args, **kwargs):
        record("upload", bucket, key)
        return await simple_upload(fs, bucket, key, *args, **kwargs)

    async def recorded_initiate_upload(fs, bucket, key, *args, **kwargs):
        record("upload", bucket, key)
        return await initiate_upload(fs, bucket, key, *args, **kwargs)

    async def recorded_copy(self, path1, path2, **kwargs):
        bucket, key, _ = self.split_path(path2)
        record("copy", bucket, key)
        return await copy(self, path1, path2, **kwargs)

    gcsfs.core.simple_upload = recorded_simple_upload
    gcsfs.core.initiate_upload = recorded_initiate_upload
    gcsfs.core.GCSFileSystem._cp_file = recorded_copy


patch_gcsfs()

from pdpo_jax import cli, object_store  # noqa: E402


def recorded_object_upload(path, data, *, if_generation_match, _upload=object_store._upload):
    bucket, key = object_store._object_name(path)
    record("upload", bucket, key)
    return _upload(path, data, if_generation_match=if_generation_match)


object_store._upload = recorded_object_upload

sys.exit(cli.main(sys.argv[1:]))
