"""Raw web text to training shards: steps (readers, filters, dedup, tokenize, pack, writers)
and the executors that run them (in-process, Ray Data)."""
