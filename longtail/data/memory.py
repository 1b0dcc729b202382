"""Memory before an in-memory decode (issue 24): how many bytes a decode will need against what this
process may still use, so a set that cannot fit stops with one message instead of the kernel's OOM
killer ending the run with none.

The need is the decoded uint8 tensors (images x channels x side^2) times ``DECODE_PEAK_FACTOR``, the
copies measured on top of them (``benchmarks/RESULTS.md``, "Memory of an in-memory decode"): the decode
itself writes every image straight into its preallocated tensor (``sources._Filler``), and the
validation split then copies the training tensor once (``ImageSet.subset``).

What the process may use is the smallest of: the cgroup's memory limit less its usage (v2
``memory.max``/``memory.current``, v1 ``memory.limit_in_bytes``/``memory.usage_in_bytes``, page cache that
can be dropped counted as free), the address-space limit (``RLIMIT_AS``) less the address space in use,
and the kernel's ``MemAvailable``.
"""
from __future__ import annotations

import resource
from pathlib import Path

from longtail.data.sources import DataError

__all__ = ["DECODE_PEAK_FACTOR", "decode_bytes_needed", "available_memory", "check_decode_fits"]

DECODE_PEAK_FACTOR = 2.0
CGROUP_V2 = Path("/sys/fs/cgroup")
CGROUP_V1 = Path("/sys/fs/cgroup/memory")
UNLIMITED = 1 << 60  # cgroup v1 writes "no limit" as a number near 2^63


def decode_bytes_needed(images: int, channels: int, size: int) -> int:
    """Peak bytes an in-memory decode of ``images`` images of ``channels`` x ``size`` x ``size`` adds."""
    return int(images * channels * size * size * DECODE_PEAK_FACTOR)


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_free() -> tuple[int, str] | None:
    for folder, limit_file, usage_file, cache_key in (
            (CGROUP_V2, "memory.max", "memory.current", "inactive_file"),
            (CGROUP_V1, "memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")):
        limit = _read_int(folder / limit_file)
        usage = _read_int(folder / usage_file)
        if limit is not None and usage is not None and limit < UNLIMITED:
            free = limit - usage + _stat_value(folder / "memory.stat", cache_key)
            return max(free, 0), f"the cgroup memory limit ({_gib(limit)}, {folder / limit_file})"
    return None


def _address_space_free() -> tuple[int, str] | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return None
    return max(soft - _vm_size_kib() * 1024, 0), f"the address-space limit RLIMIT_AS ({_gib(soft)}, ulimit -v)"


def _vm_size_kib() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmSize:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _mem_available() -> tuple[int, str] | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "the machine's available memory (MemAvailable)"
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> tuple[int, str] | None:
    """(bytes this process may still allocate, which limit says so), or None when nothing is known."""
    known = [found for found in (_cgroup_free(), _address_space_free(), _mem_available()) if found is not None]
    return min(known, key=lambda found: found[0]) if known else None


def _gib(count: float) -> str:
    return f"{count / 2**30:.2f} GiB"


def check_decode_fits(images: int, channels: int, size: int, source: str, size_given: bool) -> None:
    """Stop with a DataError (exit 2) when decoding ``images`` images of ``source`` into memory at
    ``size`` x ``size`` would not fit what this process may use; the message names the ways out."""
    need = decode_bytes_needed(images, channels, size)
    available = available_memory()
    if available is None or need <= available[0]:
        return
    free, limit = available
    largest_side = int((free / (images * channels * DECODE_PEAK_FACTOR)) ** 0.5) if images else 0
    size_hint = (f"a smaller data.image_size (at most {largest_side} fits)" if largest_side >= 1
                 else "a smaller data.image_size")
    raise DataError(f"decoding {images} images of {source} into memory at {channels}x{size}x{size} needs about "
                    f"{_gib(need)} ({DECODE_PEAK_FACTOR:g} x the {_gib(need / DECODE_PEAK_FACTOR)} of uint8 "
                    f"pixels) but only {_gib(free)} is free under {limit}"
                    f"{'' if size_given else ' (data.image_size unset: the images own size)'}. Use {size_hint}, "
                    "or extract the archive and set data.in_memory=no (images are then read per batch), "
                    "or keep fewer images with data.max_count")
