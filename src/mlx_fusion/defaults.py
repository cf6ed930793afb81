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

REDIS_RETRY_S = 60.0
"""How long a Redis command keeps retrying through a Redis restart before it fails."""

MONGO_DB = "mlx_fusion"
"""Default MongoDB database name."""

JOB_TIMEOUT_DEFAULT_S = 600
"""Timeout of a job that names none."""

JOB_TIMEOUT_MAX_S = 3600
"""No job runs longer than this, whatever it asks for."""

MAX_INPUT_BYTES = 1_000_000
"""Largest job document (serialized JSON) a worker accepts."""

MAX_FILE_BYTES = 100_000_000
"""Largest file a job may reference in the input folder."""

MAX_RESULT_BYTES = 1_000_000
"""Largest result kept inline in a job record; larger ones go to the blob store."""

RETENTION_DAYS = 7.0
"""Finished job documents are deleted this long after they finish (MongoDB TTL index)."""

HEARTBEAT_INTERVAL_S = 10.0
"""How often a busy worker refreshes its own and its job's liveness in Redis."""

HEARTBEAT_GRACE_INTERVALS = 6
"""A running job is declared abandoned after this many heartbeat intervals without one."""

CANCEL_POLL_S = 0.5
"""How often a busy worker looks for a cancellation of its running job."""

CANCEL_GRACE_S = 5.0
"""How long a cancelled job gets to stop by itself before its model process is killed."""

JOB_MAX_ATTEMPTS = 3
"""A job whose worker died is run again until it has started this many times."""

RECOVERY_INTERVAL_S = 30.0
"""How often an idle GPU worker looks for lost jobs (dead workers, jobs missing from Redis)."""

RECOVERY_GRACE_S = 30.0
"""How old a record must be before its job can be taken as lost."""

RESULT_TTL_S = 3600
"""How long RQ keeps its own small record of a finished job (the result lives in MongoDB)."""

MEMORY_BUDGET_FRACTION = 0.75
"""Share of the device's recommended working set that loaded models may use."""

MAX_LOADED_MODELS = 4
"""Most models loaded at once on one worker, whatever their size."""

KEEP_ALIVE_S = 300.0
"""Idle time after which a model unloads (catalog entries may override: -1 never, 0 at once)."""

LOAD_TIMEOUT_S = 600.0
"""A model load that takes longer is killed and counts as a load failure."""

LOAD_COOLDOWN_S = 5.0
"""First wait after a failed load before the model is tried again; doubles per failure."""

LOAD_COOLDOWN_MAX_S = 300.0
"""Longest wait between load attempts of a failing model."""

CAPACITY_WAIT_S = 30.0
"""How long a job waits for models in use to free memory before failing with no_capacity."""

REAP_INTERVAL_S = 1.0
"""How often idle models are checked against their keep-alive."""

STOP_GRACE_S = 5.0
"""How long a model process gets to exit when asked, before it is terminated, then killed."""

WEBHOOK_QUEUE_SUFFIX = "webhooks"
"""Webhook deliveries go to the queue ``<prefix>:webhooks`` (``mlx-fusion webhook-worker``)."""

WEBHOOK_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Waits between delivery attempts (like Svix): 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h; a
delivery gets one attempt more than there are waits."""

WEBHOOK_JITTER = 0.2
"""Each wait is stretched or shrunk by up to this fraction, at random."""

WEBHOOK_TIMEOUT_S = 15.0
"""Longest a delivery attempt may take (connect, send, response)."""

WEBHOOK_MAX_RESULT_BYTES = 64 * 1024
"""Results larger than this (as JSON) go in a webhook as a reference, not inline."""

WEBHOOK_MAX_RESPONSE_BYTES = 4096
"""At most this much of a receiver's response body is read."""

WEBHOOK_RETRY_AFTER_MAX_S = 86400.0
"""A receiver's ``Retry-After`` is honoured up to this long."""

WEBHOOK_RECONCILE_INTERVAL_S = 60.0
"""How often the webhook worker looks for deliveries that were recorded but never queued."""

WEBHOOK_RECONCILE_GRACE_S = 30.0
"""A pending delivery is taken as lost once its attempt is this far overdue with no job queued."""

WEBHOOK_SECRET_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
"""What a job's ``webhook.secret`` (the name of a configured secret) may look like."""

WEBHOOK_FUNCTION = "mlx_fusion.webhooks.delivery.deliver"
"""The only RQ job function the webhook worker runs: ``deliver(job_id, attempt)``."""

WEBHOOK_FAILED_ATTEMPT_TTL_S = 86400
"""How long RQ keeps an attempt job that raised (the attempt itself is on the job document)."""

WORKER_TTL_MAX_S = 420
"""The longest RQ worker TTL (RQ's own default): workers wake at least this often."""
