"""Peak resident memory of one call, read from the kernel's own counters in this process (Linux).

``/proc/self/clear_refs`` resets the peak (VmHWM) to the current resident set, so the peak after a call minus the
resident set before it is what the call needed at its highest. glibc is told to give large freed blocks back to the
kernel at once (a fixed mmap threshold), so the figure is what a call holds, not what an earlier call left in the
allocator's free lists.
"""
from __future__ import annotations

import ctypes
import gc
from typing import Callable, TypeVar

R = TypeVar("R")
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_memory() -> None:
    """Call once, before measuring: large blocks (64 KiB and up) are mapped and unmapped individually."""
    ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, 1 << 16)


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_growth(call: Callable[[], R]) -> tuple[R, int]:
    """``call()``'s result and how many bytes the resident set rose above its level before the call, at its peak."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kb("VmRSS")
    result = call()
    return result, (status_kb("VmHWM") - before) * 1024
