"""The OpenMP worker threads of a thread that hands its model work over to another thread.

torch's CPU operations run in parallel through OpenMP (GNU libgomp in the Linux wheels). Each thread that starts a
parallel region keeps its own pool of OpenMP worker threads for the rest of its life. When the pools together hold
more threads than the machine has cores, libgomp stops spinning between parallel regions (``GOMP_SPINCOUNT``'s
throttled count) and every region wakes its workers through the kernel. A server loads and warms its model on one
thread and decodes on another: on 2 cores (benchmarks/openmp_threads.py, docs/serving.md), an element-wise product
of (160, 576) floats took 64.2 us instead of 8.0 on the second thread while the first thread's pool was kept, a
decode step of 28 rows 83.0 ms instead of 73.9. So the thread that starts the worker hands its own pool back
(OpenMP 5.0's ``omp_pause_resource_all``, which libgomp implements by ending the calling thread's pool; its next
parallel region makes a new one).

Only libgomp: LLVM's libomp implements a hard pause by shutting its whole runtime down, every thread's.
"""

from __future__ import annotations

import ctypes
import os
import sys
from functools import cache

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2


@cache
def _pause():
    """libgomp's ``omp_pause_resource_all`` as loaded in this process (torch's own first), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open("/proc/self/maps") as maps:
            paths = {line.split(None, 5)[-1].strip() for line in maps if "libgomp" in line}
    except OSError:
        return None
    import torch

    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(paths, key=lambda p: (not p.startswith(torch_lib), p)):
        if not os.path.isfile(path):
            continue
        try:
            pause = ctypes.CDLL(path).omp_pause_resource_all  # the library already loaded: the same handle
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    return None


def release_openmp_threads() -> bool:
    """End the calling thread's pool of idle OpenMP worker threads (True if libgomp did; False where torch does not
    run on libgomp). Call it outside any parallel region, on the thread that ran model work, when another thread
    takes that work over."""
    pause = _pause()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0
