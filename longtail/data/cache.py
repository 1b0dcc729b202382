"""Cache of decoded datasets: decoding the 60,000 images of a CIFAR archive takes seconds to tens of
seconds on a small machine, loading the decoded uint8 tensors back well under one.

One file per source and decoding variant, under ``data.cache_dir``, else ``$LONGTAIL_CACHE``, else
``~/.cache/longtail``. The key is the source's resolved path, size and modification time (for a folder,
the number, total size and newest modification time of its files), so a changed source is decoded
again. Files are written atomically (temporary file + ``os.replace``), so concurrent runs never read a
half-written cache, and read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from longtail.data.sources import Decoded

__all__ = ["cache_root", "source_key", "load_or_build"]

CACHE_FORMAT = 1  # bump when the stored layout or the decoding changes


def cache_root(configured: str | None = None) -> Path:
    """``configured``, else ``$LONGTAIL_CACHE``, else ``~/.cache/longtail``."""
    return Path(configured or os.environ.get("LONGTAIL_CACHE") or Path.home() / ".cache" / "longtail").expanduser()


def _fingerprint(path: Path) -> str:
    path = path.resolve()
    if path.is_dir():
        count, total, newest = 0, 0, 0
        for folder, _, files in os.walk(path):
            for name in files:
                info = os.stat(os.path.join(folder, name))
                count, total, newest = count + 1, total + info.st_size, max(newest, info.st_mtime_ns)
        return f"{path}|dir|{count}|{total}|{newest}"
    info = path.stat()
    return f"{path}|{info.st_size}|{info.st_mtime_ns}"


def source_key(sources: Sequence[Path], variant: str) -> str:
    """Identity of the decoded data: every source path's fingerprint plus how it was decoded."""
    return "\n".join([f"format {CACHE_FORMAT}", variant, *(_fingerprint(Path(s)) for s in sources)])


def load_or_build(sources: Sequence[Path], variant: str, build: Callable[[], Decoded],
                  cache_dir: str | None = None) -> Decoded:
    """The cached decoding of ``sources`` if it is current, else ``build()`` and store it.
    A cache that cannot be written only costs time: it is reported as a warning."""
    key = source_key(sources, variant)
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(sources[0]).name)[:60]
    path = cache_root(cache_dir) / f"{slug}-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            state = torch.load(path, weights_only=True)
            if state.get("key") == key:
                return Decoded.from_state(state["data"])
        except Exception as error:  # a damaged cache file is rebuilt, never trusted
            warnings.warn(f"ignoring unreadable cache {path} ({error}); decoding again", stacklevel=2)
    decoded = build()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "data": decoded.to_state()}, tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the decoded-data cache {path} ({error}); the next run decodes again. "
                      "Set data.cache_dir or $LONGTAIL_CACHE to a writable folder", stacklevel=2)
    return decoded
