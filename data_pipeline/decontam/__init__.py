"""Decontamination: training documents sharing a word n-gram with an evaluation set, found by
a join of n-gram hashes partitioned by hash (:mod:`.overlap`) and dropped or marked per part
(:mod:`.apply`)."""
