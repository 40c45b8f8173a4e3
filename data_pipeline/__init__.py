"""Raw web text to training shards: steps (readers, filters, dedup, tokenize, pack, writers)
grouped into stages (``stages/``, ``shards/``) that ``pipeline.py`` lists in order, and the two
executors (in-process, Ray Data) that run any list of stages through one contract
(``executors/base.py``); the training reader (``training_reader.py``) reads the shards back."""
