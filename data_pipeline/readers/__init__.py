"""Readers: turn input files (JSONL plain/.gz/.zst, Parquet, WARC, WET) into documents."""
