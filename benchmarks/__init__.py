"""Latency and throughput of every backend against PyTorch eager, measured in one process.

Layer: the top; may import ``sat_export``, ``engines`` and ``training``. Nothing imports it.
"""
