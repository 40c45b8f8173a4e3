"""After fine-tuning: rejection sampling with a reward model (the reward model itself is the
train job's ``kind: reward``)."""
