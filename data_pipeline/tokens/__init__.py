"""Tokens: train or load a byte-level BPE tokenizer, encode documents and pack them into rows."""
