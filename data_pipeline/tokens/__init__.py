"""Tokens: train (byte-level BPE or BERT's WordPiece) or load a tokenizer, encode documents
and pack them into rows; turn packed rows into masked-LM samples for BERT."""
