"""Training data: shard writing and reading, the epoch/rank/worker plan, the streaming loader."""
