"""Give freed heap back to the operating system after big, one-off allocations.

A first full apply renders ~70,000 elements to JSON and libnftables parses them: some 200 MB
of C and Python heap that is freed right after but stays mapped in the process (glibc keeps
freed arenas). malloc_trim(0) returns it, so the agent's RSS reflects what it keeps, not what
it once needed.

Reading a big list also pauses the cyclic garbage collector (:func:`gc_paused`), and what
survives a big change is frozen out of its reach (:func:`release`).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import threading
from collections.abc import Iterator


def release() -> None:
    """Collect, freeze what is left, and trim the heap.

    The agent holds a whole cluster (150,000 pods: millions of objects). A full collection
    walks them all and stalls whichever thread triggered it for half a second, at random,
    e.g. in the middle of a sync. ``gc.freeze`` moves every object alive now out of the
    collector's generations, so later collections only walk what changed since; cycles that
    die among the frozen objects (rare: a label set that no pod uses any more) wait for the
    next release, which unfreezes first.
    """
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


_pause_lock = threading.Lock()
_pauses = 0
_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside (threads may nest and overlap it).

    A page of a list is ~50,000 containers that live just long enough to be promoted, so a
    collection every few pages walks every object the agent holds: at 150,000 pods, half
    of the list's time. Decoded JSON has no cycles: reference counting frees the page. The
    few cycles the model makes (a shared label map and its view) are long-lived anyway;
    the collector runs again as soon as the last pause ends.
    """
    global _pauses, _was_enabled
    with _pause_lock:
        if _pauses == 0:
            _was_enabled = gc.isenabled()
            gc.disable()
        _pauses += 1
    try:
        yield
    finally:
        with _pause_lock:
            _pauses -= 1
            if _pauses == 0 and _was_enabled:
                gc.enable()
