"""Supervised fine-tuning (``kind: finetune``): the train job started from a base model (a
crucible checkpoint or a Hugging Face directory), on chat shards, fully or with LoRA."""
