"""Time the real operators of LLM inference and write them as tidy parquet tables.

Importing this package must not import torch: ``profiler.tables`` is read by the estimator.
"""
