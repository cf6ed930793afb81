"""Enqueue a mlx-fusion job with plain Redis commands, as a producer in any language would.

Only a Redis client is used: no rq, no mlx_fusion. Usage:

    python examples/raw_enqueue.py REDIS_URL [QUEUE] < job.json

prints the job id. The commands (see docs/contract.md):

    HSET rq:job:<id> data <payload> origin <queue> status queued created_at <ts> enqueued_at <ts>
                     timeout <seconds> description <text>
    RPUSH rq:queue:<queue> <id>
    SADD rq:queues rq:queue:<queue>

where <payload> is the JSON text ["mlx_fusion.worker.run_job", null, [<job document>], {}]
(optionally zlib-compressed) and <ts> is UTC like 2026-11-26T15:54:02.675126Z.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import uuid

import redis

JOB_FUNCTION = "mlx_fusion.worker.run_job"


def enqueue(client: redis.Redis, document: dict, queue: str = "fusion:default") -> str:
    job_id = document.setdefault("id", uuid.uuid4().hex)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    payload = json.dumps([JOB_FUNCTION, None, [document], {}])
    with client.pipeline(transaction=True) as tx:  # MULTI ... EXEC: all or nothing
        tx.hset(
            f"rq:job:{job_id}",
            mapping={
                "data": payload,
                "origin": queue,
                "status": "queued",
                "created_at": now,
                "enqueued_at": now,
                "timeout": str(int(document.get("timeout_s", 600))),
                "description": f"{document.get('kind')} {document.get('model')}",
            },
        )
        tx.rpush(f"rq:queue:{queue}", job_id)
        tx.sadd("rq:queues", f"rq:queue:{queue}")
        tx.execute()
    return job_id


if __name__ == "__main__":
    url = sys.argv[1]
    queue_name = sys.argv[2] if len(sys.argv) > 2 else "fusion:default"
    job = json.load(sys.stdin)
    print(enqueue(redis.Redis.from_url(url), job, queue_name))
    assert "rq" not in sys.modules and "mlx_fusion" not in sys.modules
