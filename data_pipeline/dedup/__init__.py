"""Dedup: exact (text hashes) and fuzzy (MinHash LSH + distributed connected components)."""
