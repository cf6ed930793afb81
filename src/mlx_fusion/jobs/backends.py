"""Which database backs the job store: MongoDB when a URL is configured, else an embedded store.

- ``mongodb://...`` / ``mongodb+srv://...``: a real MongoDB (production).
- unset: montydb on SQLite in ``data_dir`` (single host, dev: works across processes on one host,
  no TTL index, no server-side unique index; not for production).
- ``mongomock://``: an in-process mock (tests and experiments; one process only).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from mlx_fusion.config import Settings
from mlx_fusion.defaults import JOBS_COLLECTION
from mlx_fusion.errors import JobStoreError
from mlx_fusion.jobs.blobs import FileBlobs, GridFSBlobs
from mlx_fusion.jobs.store import JobStore

_SERVER_SELECTION_TIMEOUT_MS = 5000


def _retention(settings: Settings) -> dt.timedelta:
    return dt.timedelta(days=settings.retention_days)


def embedded_store_path(settings: Settings) -> str:
    """Where the embedded (montydb) store keeps its files."""
    return str(settings.data_dir / "jobstore")


def connect_store(settings: Settings, *, ensure_indexes: bool = True) -> JobStore:
    """A ``JobStore`` for the configured backend."""
    url = settings.mongo_url
    if url is None:
        store = _montydb_store(settings)
    elif url.startswith("mongomock://"):
        import mongomock
        import mongomock.gridfs

        mongomock.gridfs.enable_gridfs_integration()  # type: ignore[no-untyped-call]
        client: Any = mongomock.MongoClient(tz_aware=True)
        store = _mongo_store(client[settings.mongo_db], settings, serialize=True)
    else:
        import pymongo

        client = pymongo.MongoClient(
            url, tz_aware=True, serverSelectionTimeoutMS=_SERVER_SELECTION_TIMEOUT_MS
        )
        store = _mongo_store(client[settings.mongo_db], settings)
    if ensure_indexes:
        store.ensure_indexes()
    return store


def _mongo_store(database: Any, settings: Settings, *, serialize: bool = False) -> JobStore:
    return JobStore(
        database[JOBS_COLLECTION],
        retention=_retention(settings),
        blobs=GridFSBlobs(database),
        serialize=serialize,
    )


def _montydb_store(settings: Settings) -> JobStore:
    try:
        from montydb import MontyClient, set_storage
        from montydb import errors as monty_errors
        from montydb.storage import StorageDuplicateKeyError
    except ImportError as e:  # pragma: no cover - montydb is a dependency
        raise JobStoreError("montydb is not installed; set FUSION_MONGO_URL") from e
    path = embedded_store_path(settings)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # the jobs of a batch write from their own threads: every operation is serialized (the
    # store's lock) and SQLite connections may be used from any thread
    set_storage(path, storage="sqlite", use_bson=False, check_same_thread=False)
    client = MontyClient(path)
    return JobStore(
        client[settings.mongo_db][JOBS_COLLECTION],
        retention=_retention(settings),
        duplicate_errors=(monty_errors.DuplicateKeyError, StorageDuplicateKeyError),
        store_errors=(monty_errors.MontyError,),
        naive_datetimes=True,
        blobs=FileBlobs(settings.data_dir / "blobs"),
        serialize=True,
    )
