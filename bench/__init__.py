"""Benchmarks: one shared harness (:mod:`bench.harness`) and the scripts that use it.

Run a script as a module from the repository root, e.g. ``python -m bench.attention_speed``.
"""
