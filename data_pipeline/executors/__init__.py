"""Executors: one contract (:mod:`.base`) that runs any list of stages, implemented in-process
(tests, debugging, laptops) and on Ray Data (at scale). Only executors import Ray."""
