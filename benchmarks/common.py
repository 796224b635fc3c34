"""Shared benchmark helpers: the machine's matmul peak and peak memory, measured in the same run."""

from __future__ import annotations

import resource
import statistics
import time

import torch


def matmul_gflops(n: int = 2048, iters: int = 10, repeats: int = 5) -> float:
    """fp32 n x n matmul throughput with the current thread count (median of repeats)."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(iters):
            a @ b
        rates.append(2 * n**3 * iters / (time.perf_counter() - t) / 1e9)
    return round(statistics.median(rates), 1)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss is KiB on Linux)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
