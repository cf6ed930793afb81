"""Names and defaults shared by producers and workers, each in one place."""

from __future__ import annotations

JOB_FUNCTION = "mlx_fusion.worker.run_job"
"""The only RQ job function a mlx-fusion worker runs; producers name it in the RQ payload."""

QUEUE_PREFIX = "fusion"
"""Queue names are ``<prefix>:<priority>``: ``fusion:high``, ``fusion:default``, ``fusion:low``."""

PRIORITIES = ("high", "default", "low")
"""Job priorities, in the order workers drain their queues."""

JOBS_COLLECTION = "jobs"
"""MongoDB collection holding one document per job, ``_id`` = job id."""

MONGO_DB = "mlx_fusion"
"""Default MongoDB database name."""

JOB_TIMEOUT_DEFAULT_S = 600
"""Timeout of a job that names none."""

JOB_TIMEOUT_MAX_S = 3600
"""No job runs longer than this, whatever it asks for."""

MAX_INPUT_BYTES = 1_000_000
"""Largest job document (serialized JSON) a worker accepts."""

RETENTION_DAYS = 7.0
"""Finished job documents are deleted this long after they finish (MongoDB TTL index)."""

HEARTBEAT_INTERVAL_S = 10.0
"""How often a busy worker refreshes its own and its job's liveness in Redis."""

HEARTBEAT_GRACE_INTERVALS = 6
"""A running job is declared abandoned after this many heartbeat intervals without one."""

RESULT_TTL_S = 3600
"""How long RQ keeps its own small record of a finished job (the result lives in MongoDB)."""
