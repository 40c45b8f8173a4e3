"""The train job: Ray Train workers running DeepSpeed ZeRO-3 on the training shards, with
atomic checksummed checkpoints and exact resume."""
