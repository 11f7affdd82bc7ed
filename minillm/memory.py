"""Memory accounting: how much resident memory (RSS) the process holds, now and at its peak.

Linux reports both in /proc/self/status: VmRSS (now), split into RssAnon (memory the process
allocated) and RssFile (pages of files it mapped), and VmHWM (the high-water mark). Pages of a
memory-mapped file count in RSS while they are resident, so reading a mapped model raises RSS
even though nothing was copied. Writing "5" to /proc/self/clear_refs resets the high-water mark
to the current RSS, so the peak of one stretch of work can be measured on its own.
"""

import ctypes
import gc
import os
import re
import resource
import sys
from dataclasses import dataclass

import numpy as np

from .errors import UsageError

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


def return_freed_memory_at_once() -> bool:
    """Make the C allocator give freed memory back to the OS at once, so RSS tracks what is alive.
    glibc keeps freed memory for reuse, and after a large array is freed it serves later large
    arrays from that kept heap instead of fresh mappings (its mmap threshold adapts upwards): the
    RSS a capped run reaches would then depend on its history, not on its plan. Fixed thresholds
    (arrays of 128 KiB or more mapped on their own, heap tops of 128 KiB or more trimmed) stop
    both; what glibc already kept is trimmed now. False where the allocator is not glibc's."""
    ok = set_allocator_thresholds(mapped_from=128 << 10, trimmed_from=128 << 10)
    give_back_kept_memory()
    return ok


def keep_freed_memory() -> bool:
    """Make the C allocator keep freed memory for reuse, for a run without --mem-cap. A forward pass
    allocates and frees arrays of hundreds of KiB to a few MiB in every layer. By default glibc maps
    arrays from 128 KiB on their own and returns a free heap top of a few MiB to the OS, so each
    layer's arrays came back as fresh pages that the OS zero-fills one fault at a time (tens of
    thousands of faults in one prompt; the README's performance section has the measurement). With
    arrays up to 4 MiB taken from the heap and up to 64 MiB of free heap top kept, the next layer
    reuses the pages. Larger arrays (long contexts' scores, many positions' logits) are still mapped
    on their own: from the heap, the holes they leave would raise the peak RSS. A capped run takes
    `return_freed_memory_at_once` instead. False where the allocator is not glibc's."""
    return set_allocator_thresholds(mapped_from=4 << 20, trimmed_from=64 << 20)


def set_allocator_thresholds(mapped_from: int, trimmed_from: int) -> bool:
    """glibc's malloc: arrays of `mapped_from` bytes or more mapped on their own (freed straight back
    to the OS), and a free heap top of `trimmed_from` bytes or more returned to the OS. Fixed values
    stop glibc adapting them. False where the allocator is not glibc's."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
    return mallopt(M_MMAP_THRESHOLD, mapped_from) == 1 and mallopt(M_TRIM_THRESHOLD, trimmed_from) == 1


def give_back_kept_memory():
    """Hand what the C allocator kept of freed memory back to the OS now, leaving its thresholds (and
    so the speed of later allocations) as they are: for a measurement that starts from a baseline."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------------------------------------
# Sizes on the command line: "96MiB", "64MB", "0.5GB". A unit is required, so "64" (bytes? MB?)
# is never guessed.

SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def parse_size(text: str, flag: str = "--mem-cap") -> int:
    """Bytes from a size with a unit: KB/MB/GB are powers of 10, KiB/MiB/GiB powers of 2.
    Raises UsageError for anything else (no unit, a negative or zero size, an unknown unit)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]+)\s*", text)
    unit = match and match.group(2).upper()
    if not match or unit not in SIZE_UNITS:
        raise UsageError(f"{flag} {text!r} is not a size with a unit: write e.g. 96MiB, 64MB or 0.5GB "
                         "(KB/MB/GB = 1000^n bytes, KiB/MiB/GiB = 1024^n)")
    size = int(float(match.group(1)) * SIZE_UNITS[unit])
    if size <= 0:
        raise UsageError(f"{flag} {text!r} must be more than 0 bytes")
    return size


def mib(n: int) -> str:
    return f"{n / MiB:.1f} MiB"


# ---------------------------------------------------------------------------------------------
# Measuring one run: the baseline is the process after warm-up, the peak is measured from there.

@dataclass(frozen=True)
class Measurement:
    """What a run added on top of its baseline, in bytes. `peak` is the high-water mark minus the
    baseline RSS; the kernel keeps no high-water mark per kind, so `anon` and `file` split the RSS
    held at the end of the run (weights, buffers and cache are all still held then)."""
    baseline: int
    peak: int
    anon: int
    file: int
    peak_was_reset: bool   # False: the kernel refused clear_refs, so `peak` may predate the baseline

    def format(self) -> str:
        note = "" if self.peak_was_reset else " (high-water mark could not be reset: it may predate the baseline)"
        return (f"memory: peak {mib(self.peak)} above the baseline of {mib(self.baseline)} "
                f"(held at the end: {mib(self.anon)} anonymous, {mib(self.file)} file-backed){note}")


class Meter:
    """Start at the baseline (resetting the high-water mark there), then `measure()` at any time."""

    def __init__(self):
        gc.collect()
        self.peak_was_reset = reset_peak()
        self.start = usage()

    @property
    def baseline(self) -> int:
        return self.start.rss

    def measure(self) -> Measurement:
        now = usage()
        return Measurement(baseline=self.start.rss, peak=now.peak - self.start.rss, anon=now.anon - self.start.anon,
                           file=now.file - self.start.file, peak_was_reset=self.peak_was_reset)


def cache_arrays(cache) -> list:
    """The arrays of a KV cache (minillm.kvcache: KVCache, or PatternKVCache's rows per layer)."""
    if hasattr(cache, "layers"):
        return [a for layer in cache.layers for a in (layer.rows.k, layer.rows.v)]
    return [cache.k, cache.v]


def touch_pages(arrays: list):
    """Write one byte per page of each array, so the memory a zero-filled array reserved is resident
    now: the KV cache then holds its planned size from the first token, not after the last, and a
    plan that is wrong shows at the start of a run."""
    page = os.sysconf("SC_PAGE_SIZE")
    for a in arrays:
        flat = a.reshape(-1).view(np.uint8)
        flat[::page] |= 0  # a write, even of the same value, makes the page resident (`x = x` is skipped)
