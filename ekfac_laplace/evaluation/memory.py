"""Peak resident memory of a block of code (Linux ``/proc``).

The kernel keeps a process's peak resident set size (``VmHWM`` in
``/proc/self/status``) and resets it to the current size when ``5`` is written to
``/proc/self/clear_refs``. :class:`PeakMemory` resets it on entry, after returning
freed heap pages to the operating system (so that memory freed earlier does not hide
a new peak), and reads it on exit. Used by the comparison harness (growth during a
``fit``) and by ``benchmarks/benchmark.py`` (absolute peak of a phase in a fresh
process). Elsewhere than Linux the numbers are ``None``.
"""

from __future__ import annotations

import ctypes
import gc


def status_kib(field_name: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (``VmRSS``, ``VmHWM``, ...).

    Args:
        field_name: The field.

    Returns:
        Its value in KiB, or ``None`` where it cannot be read.
    """
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak() -> bool:
    """Reset the peak resident set size to the current one.

    Returns:
        Whether the kernel accepted the reset (else the peak is the process's).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def release_free_heap() -> None:
    """Return freed heap pages to the operating system (glibc's ``malloc_trim``)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """The peak resident memory while the block runs, and its growth.

    Attributes:
        before_mib: Resident memory on entry, in MiB.
        peak_mib: Peak resident memory during the block (of the process, if the
            peak could not be reset), in MiB.
        growth_mib: ``peak_mib - before_mib`` (at least 0); ``None`` unless the
            peak was reset.
        exact: Whether the peak was reset on entry.
    """

    def __init__(self) -> None:
        self.before_mib: float | None = None
        self.peak_mib: float | None = None
        self.growth_mib: float | None = None
        self.exact = False

    def __enter__(self) -> PeakMemory:
        gc.collect()
        release_free_heap()
        self.exact = reset_peak()
        before = status_kib("VmRSS")
        self.before_mib = None if before is None else before / 1024
        return self

    def __exit__(self, *exc_info: object) -> None:
        peak = status_kib("VmHWM")
        if peak is None or self.before_mib is None:
            return
        self.peak_mib = peak / 1024
        if self.exact:
            self.growth_mib = max(self.peak_mib - self.before_mib, 0.0)
