"""The pipeline's stages, in order, separated by the shuffles the algorithm needs: filter (one
task per part: read -> filters -> text hash, MinHash signature and band keys), exact dedup
(shuffle by text hash), fuzzy dedup (LSH buckets -> verify -> connected components), finalise
(one task per part); then tokenize -> pack -> shards (:mod:`crucible.data_pipeline.shards`)."""
