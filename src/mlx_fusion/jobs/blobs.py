"""Large outputs of jobs (results past the inline limit, generated images), stored beside the job
record: in MongoDB GridFS (bucket ``blobs``), or as files in the data directory for the embedded
single-host store. Each blob carries its job id and an expiry (the job's retention); expired
blobs are purged by ``purge_expired``, which workers run periodically.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from mlx_fusion.errors import JobStoreError

BUCKET = "blobs"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")


class BlobStore(Protocol):
    """Where large job outputs live."""

    def put(
        self, job_id: str, name: str, data: bytes, *, content_type: str, expire_at: dt.datetime
    ) -> str:
        """Store ``data``; returns the blob id."""
        ...

    def get(self, blob_id: str) -> bytes:
        """The blob's bytes; ``JobStoreError`` if there is none."""
        ...

    def purge_expired(self, now: dt.datetime) -> int:
        """Delete blobs whose job's retention has passed; returns how many."""
        ...


BlobWriter = Callable[[str, bytes, str], dict[str, Any]]
"""``put(name, data, content_type) -> blob_ref``: how a kind's ``finish`` hook stores an output."""


def blob_ref(blob_id: str, data: bytes, content_type: str) -> dict[str, Any]:
    """What a job record holds in place of an output stored as a blob."""
    return {"blob_id": blob_id, "bytes": len(data), "content_type": content_type}


class GridFSBlobs:
    """Blobs in GridFS (pymongo's legacy ``GridFS`` API, which mongomock also implements)."""

    def __init__(self, database: Any) -> None:
        import gridfs

        self._fs = gridfs.GridFS(database, collection=BUCKET)
        self._files = database[f"{BUCKET}.files"]

    def put(
        self, job_id: str, name: str, data: bytes, *, content_type: str, expire_at: dt.datetime
    ) -> str:
        metadata = {"job_id": job_id, "content_type": content_type, "expire_at": expire_at}
        return str(self._fs.put(data, filename=f"{job_id}/{name}", metadata=metadata))

    def get(self, blob_id: str) -> bytes:
        import gridfs
        from bson import ObjectId
        from bson.errors import InvalidId

        try:
            return bytes(self._fs.get(ObjectId(blob_id)).read())
        except (gridfs.errors.NoFile, InvalidId) as e:
            raise JobStoreError(f"no blob {blob_id!r}") from e

    def purge_expired(self, now: dt.datetime) -> int:
        expired = [d["_id"] for d in self._files.find({"metadata.expire_at": {"$lt": now}})]
        for file_id in expired:
            self._fs.delete(file_id)
        return len(expired)


class FileBlobs:
    """Blobs as files under a directory (the embedded single-host store)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, blob_id: str) -> Path:
        if _SAFE_NAME.search(blob_id) or blob_id.startswith("."):
            raise JobStoreError(f"no blob {blob_id!r}")
        return self._root / blob_id

    def put(
        self, job_id: str, name: str, data: bytes, *, content_type: str, expire_at: dt.datetime
    ) -> str:
        self._root.mkdir(parents=True, exist_ok=True)
        blob_id = _SAFE_NAME.sub("_", f"{job_id}-{uuid.uuid4().hex[:8]}-{name}")
        path = self._path(blob_id)
        meta = {"job_id": job_id, "content_type": content_type, "expire_at": expire_at.isoformat()}
        path.with_name(path.name + ".meta").write_text(json.dumps(meta))
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return blob_id

    def get(self, blob_id: str) -> bytes:
        try:
            return self._path(blob_id).read_bytes()
        except FileNotFoundError as e:
            raise JobStoreError(f"no blob {blob_id!r}") from e

    def purge_expired(self, now: dt.datetime) -> int:
        count = 0
        for meta_path in self._root.glob("*.meta") if self._root.is_dir() else ():
            expire_at = dt.datetime.fromisoformat(json.loads(meta_path.read_text())["expire_at"])
            if expire_at < now:
                meta_path.with_suffix("").unlink(missing_ok=True)
                meta_path.unlink(missing_ok=True)
                count += 1
        return count
