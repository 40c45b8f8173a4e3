"""What is trained: the GPT decoder, its presets, parameter/FLOP accounting, and the
DeepSpeed wrapping (kept apart from the model itself)."""
