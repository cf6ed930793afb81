"""mlx-fusion: the Tier-3 inference worker.

Tier 2 enqueues job documents into Redis (RQ, JSON serializer); GPU-bound workers run them on MLX
models and write status and results to MongoDB. See ``docs/contract.md`` for the wire contract.
"""

__version__ = "0.1.0"
