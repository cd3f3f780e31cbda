"""Memory that the C allocator keeps after PyTorch has freed it, given back to the system during a run.

On Linux, glibc's `malloc` serves PyTorch's CPU tensors. A run's tensors change size from step to step (batches of
different lengths, a curriculum that lengthens them, evaluations that generate). Some of them come from glibc's
heap, where the holes left between live blocks stay in the process, and in a process that first rendered the
synthetic world (the demo's) they add up fast. Measured (bench/heap_growth.py, docs/experiments.md, 2026-12-04):
stage 1 of the demo after rendering its world grew from 1.26 to 2.44 GiB between steps 100 and 700 (a one-core
30-minute demo was killed at 13.1 GB), against 1,195 steps under 1.71 GiB without the rendering; with this trimmer
the first case peaked at 2.16 GiB at the same speed, and a one-core 30-minute `gpt2mm demo --stages sft,ppo` at
2.51 GB against 3.89 GB. `malloc_trim(0)` hands those pages back. `HeapTrimmer` calls it when the resident size has
grown by `growth` bytes beyond what a step needs, so a run whose memory does not grow pays nothing but reading
/proc/self/statm once a step, and at most once every `interval` seconds. A trim costs 0.4-0.5 s on a 2-core CPU
(the trim and, likely, the page faults of memory that comes back), and in bf16 the demo's resident size regrew
512 MiB every 4-42 steps: trimming at every such growth cost 9% of the steps of its stage 1 (108 trims in 8 minutes;
once a minute: 8 trims, the untrimmed pace, a peak of 3.3 GiB against 3.4 untrimmed and 2.7 trimming at every
growth; bench/RESULTS.md, 2026-12-06). Where there is no glibc or no /proc (macOS, Windows, musl), it does
nothing."""

from __future__ import annotations

import ctypes
import os
import sys
import time
from collections.abc import Callable

GROWTH = 512 * 2**20  # bytes of growth that make the trimmer call malloc_trim
INTERVAL = 60.0  # seconds at least from one trim to the next


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, or None where the process has no glibc or no /proc/self/statm."""
    if not sys.platform.startswith("linux") or not os.path.exists("/proc/self/statm"):
        return None
    try:
        return ctypes.CDLL(None).malloc_trim  # the running process's own C library
    except (OSError, AttributeError):  # musl has no malloc_trim
        return None


def resident_bytes() -> int | None:
    """The process's resident set size in bytes (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class HeapTrimmer:
    """Call once a step: trims glibc's heap when the resident size is `growth` bytes above where it stood one
    step after the last trim (the first call sets that floor: by then a step's pages are all in use again, so
    the floor is the run's live memory and one step's working set), and `interval` seconds or more have passed
    since its last trim. Returns whether it trimmed; `trims` counts the calls to malloc_trim."""

    def __init__(
        self, growth: int = GROWTH, interval: float = INTERVAL, clock: Callable[[], float] = time.monotonic
    ):
        self.growth = growth
        self.interval = interval
        self.clock = clock
        self.trim = _malloc_trim()
        self.floor: int | None = None
        self.last: float | None = None  # the clock at the last trim
        self.trims = 0

    def __call__(self) -> bool:
        resident = resident_bytes() if self.trim is not None else None
        if resident is None:
            return False
        if self.floor is None:
            self.floor = resident
            return False
        if resident < self.floor + self.growth:
            return False
        if self.last is not None and self.clock() - self.last < self.interval:
            return False
        self.trim(0)
        self.trims += 1
        self.floor = None
        self.last = self.clock()
        return True
