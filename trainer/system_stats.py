"""Memory and utilisation samples for metrics.jsonl's `system` lines.

On CUDA: torch's allocator counters (host-side reads, no device sync) plus NVML totals/utilisation when the
library is present. On a CPU-only machine: the process's resident memory.
"""

from __future__ import annotations

import functools
from typing import Any

GB = 1024**3


@functools.cache
def _nvml_handle(index: int):
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception:  # no driver / no library: NVML numbers are optional
        return None


def system_sample() -> dict[str, Any]:
    import torch

    if not torch.cuda.is_available():
        import psutil

        return {"cpu_rss_gb": round(psutil.Process().memory_info().rss / GB, 4)}
    dev = torch.cuda.current_device()
    sample: dict[str, Any] = {
        "gpu_mem_allocated_gb": round(torch.cuda.memory_allocated(dev) / GB, 4),
        "gpu_mem_reserved_gb": round(torch.cuda.memory_reserved(dev) / GB, 4),
        "gpu_mem_peak_gb": round(torch.cuda.max_memory_allocated(dev) / GB, 4),
        "gpu_mem_total_gb": round(torch.cuda.get_device_properties(dev).total_memory / GB, 4),
        "gpu_util_percent": None,
    }
    handle = _nvml_handle(dev)
    if handle is not None:
        import pynvml

        try:
            sample["gpu_util_percent"] = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except pynvml.NVMLError:
            pass
    return sample
