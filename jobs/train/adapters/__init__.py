"""The private APIs of other libraries that crucible cannot avoid, one small module per
library, each pinned by a test to the versions it supports (tests/jobs/test_train_adapters.py)."""
