"""Memory accounting: how much resident memory (RSS) the process holds, now and at its peak.

Linux reports both in /proc/self/status: VmRSS (now), split into RssAnon (memory the process
allocated) and RssFile (pages of files it mapped), and VmHWM (the high-water mark). Pages of a
memory-mapped file count in RSS while they are resident, so reading a mapped model raises RSS
even though nothing was copied. Writing "5" to /proc/self/clear_refs resets the high-water mark
to the current RSS, so the peak of one stretch of work can be measured on its own.
"""

import resource
import sys
from dataclasses import dataclass

MiB = 1 << 20


def _status_kib() -> dict:
    """/proc/self/status as {field: KiB} for the memory fields; empty where the OS has no /proc."""
    fields = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                name, _, value = line.partition(":")
                if value.strip().endswith("kB"):
                    fields[name] = int(value.split()[0])
    except OSError:
        pass
    return fields


@dataclass(frozen=True)
class Usage:
    """One reading of the process's memory, in bytes."""
    rss: int    # resident now
    anon: int   # of which allocated by the process (arrays, interpreter)
    file: int   # of which pages of mapped files (the model file, shared libraries)
    peak: int   # the high-water mark of rss since start or since the last reset_peak()


def usage() -> Usage | None:
    """Resident memory now and at its peak, or None where the OS does not report it."""
    kib = _status_kib()
    if "VmRSS" not in kib:
        return None
    return Usage(rss=kib["VmRSS"] * 1024, anon=kib.get("RssAnon", 0) * 1024,
                 file=kib.get("RssFile", 0) * 1024, peak=kib.get("VmHWM", kib["VmRSS"]) * 1024)


def rss_bytes() -> int | None:
    """Resident memory now, or None where the OS does not report it."""
    now = usage()
    return None if now is None else now.rss


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (since the last reset_peak() where that worked)."""
    now = usage()
    if now is not None:
        return now.peak
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


def reset_peak() -> bool:
    """Reset the high-water mark to the current RSS; False where the kernel does not allow it
    (then only the peak since start can be reported, beside the baseline)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
