"""Shared timer and machine label for the benchmarks (CPU: time.perf_counter)."""

from __future__ import annotations

import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable


@dataclass
class Timing:
    best: float  # seconds
    median: float
    repeats: int

    def gbps(self, nbytes: int) -> float:
        """Throughput of the best run, in GB/s (1e9 bytes)."""
        return nbytes / self.best / 1e9


def timeit(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> Timing:
    """Runs ``fn`` ``warmup`` times untimed, then ``repeat`` times; best and median seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return Timing(min(times), statistics.median(times), repeat)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> str:
    """One paragraph naming the machine and the library versions behind every number."""
    import numpy as np

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    parts = [
        f"CPU: {cpu_model()} ({cores} usable cores, {os.cpu_count()} online)",
        f"Python {platform.python_version()} on {platform.system()} {platform.release()}",
        f"numpy {np.__version__}",
    ]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except ImportError:
        parts.append("torch: not installed")
    try:
        import tensorvigil

        parts.append(f"tensorvigil {tensorvigil.__version__}")
    except ImportError:
        pass
    return "\n".join(parts)
