"""Memory and utilisation samples for metrics.jsonl's `system` lines.

On CUDA: torch's allocator counters (host-side reads, no device sync) plus NVML utilisation when the library
is present, polled on a daemon thread so the training thread never waits for the driver; with NVML, `gpus`
lists every visible GPU's memory in use and utilisation (the other ranks' devices of a multi-GPU run too).
On a CPU-only machine: the process's resident memory.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

GB = 1024**3
NVML_INTERVAL_S = 1.0


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
    }
    gpus = _devices_poller().latest
    # this rank's device from the same NVML poll that lists every GPU of the machine (the other ranks' too)
    sample["gpu_util_percent"] = next((g["util_percent"] for g in gpus if g["index"] == dev), None)
    if gpus:
        sample["gpus"] = gpus
    return sample


class _NoPoller:
    latest: list[dict[str, Any]] = []


def _visible_handles() -> list[tuple[int, Any]]:
    """(torch index, NVML handle) of each visible GPU; by UUID, as CUDA_VISIBLE_DEVICES renumbers the devices."""
    import pynvml
    import torch

    handles = []
    for index in range(torch.cuda.device_count()):
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            handles.append((index, pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")))
        except Exception:  # an older driver or torch without uuid: NVML's own order
            handles.append((index, _nvml_handle(index)))
    return [(i, h) for i, h in handles if h is not None]


class DevicesPoller:
    """Memory in use and utilisation of every visible GPU, from NVML on its own thread; latest is [] until known."""

    def __init__(self, handles: list[tuple[int, Any]]):
        self.handles, self.latest = handles, []
        threading.Thread(target=self._loop, name="nvml-devices", daemon=True).start()

    def _read(self, index: int, handle: Any) -> dict[str, Any]:
        import pynvml

        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        return {
            "index": index,
            "mem_used_gb": round(mem.used / GB, 4),
            "mem_total_gb": round(mem.total / GB, 4),
            "util_percent": util,
        }

    def _loop(self) -> None:
        import pynvml

        while True:
            try:
                self.latest = [self._read(i, h) for i, h in self.handles]
            except pynvml.NVMLError:
                self.latest = []
            time.sleep(NVML_INTERVAL_S)


@functools.cache
def _devices_poller() -> DevicesPoller | _NoPoller:
    if _nvml_handle(0) is None:  # initialises NVML, or tells it is missing
        return _NoPoller()
    handles = _visible_handles()
    return DevicesPoller(handles) if handles else _NoPoller()
