"""crucible: raw web text to a trained GPT.

A Ray data pipeline (``crucible.data_pipeline``) turns web text into Arrow training shards;
DeepSpeed ZeRO-3 under Ray Train (``crucible.jobs``) trains a GPT (``crucible.model``);
``crucible.monitoring`` tracks throughput and GPU-hours; ``crucible.cluster`` plans and runs
the Ray cluster it all happens on.
"""

__version__ = "0.1.0"
