"""Training shards: the shard spec, Arrow shard writer, checksummed manifest, inspect and trace."""
