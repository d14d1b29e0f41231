"""Give freed heap back to the operating system after big, one-off allocations.

A first full apply renders ~70,000 elements to JSON and libnftables parses them: some 200 MB
of C and Python heap that is freed right after but stays mapped in the process (glibc keeps
freed arenas). malloc_trim(0) returns it, so the agent's RSS reflects what it keeps, not what
it once needed.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc


def release() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)
