"""Job documents (the Tier-2 contract) and the job store."""

from mlx_fusion.jobs.backends import connect_store
from mlx_fusion.jobs.document import (
    FINAL_STATUSES,
    Job,
    JobSpec,
    Kind,
    Priority,
    Status,
    new_job_id,
    parse_job,
    parse_spec,
)
from mlx_fusion.jobs.store import JobStore, utcnow

__all__ = [
    "FINAL_STATUSES",
    "Job",
    "JobSpec",
    "JobStore",
    "Kind",
    "Priority",
    "Status",
    "connect_store",
    "new_job_id",
    "parse_job",
    "parse_spec",
    "utcnow",
]
