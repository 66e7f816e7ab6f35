"""Latency and throughput of every backend against PyTorch eager."""
