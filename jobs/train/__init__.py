"""The train job: Ray Train workers running DeepSpeed ZeRO-3 on the training shards, with
atomic checksummed checkpoints and exact resume.

Read in this order: ``run.py`` (the driver: checks, then one ``TorchTrainer``), ``loop.py``
(what every rank runs), ``engine.py`` (the model under DeepSpeed), ``callbacks/`` (ledger,
metrics, watchdog, evaluation, logs, loggers, checkpointing), ``checkpoint/`` (the commit
protocol), ``resume.py``, ``reshard.py`` (world-size changes) and ``export.py``.
"""
