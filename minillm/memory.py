"""Memory accounting: how much resident memory (RSS) the process holds, now and at its peak.

Linux reports both in /proc/self/status: VmRSS (now) and VmHWM (the high-water mark). Pages of a
memory-mapped file count in RSS while they are resident, so reading a mapped model raises RSS
even though nothing was copied.
"""

import resource
import sys

MiB = 1 << 20


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def rss_bytes() -> int | None:
    """Resident memory now, or None where the OS does not report it."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB
