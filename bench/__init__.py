"""Benchmarks: one shared harness (:mod:`bench.harness`) and the scripts that use it.

Every script runs from the repository root either way: ``python -m bench.attention_speed`` or
``python bench/attention_speed.py`` (see :mod:`bench._package` for how the second finds this package).
"""
