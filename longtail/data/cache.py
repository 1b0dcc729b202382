"""Cache of decoded datasets: decoding the 60,000 images of a CIFAR archive takes seconds to tens of
seconds on a small machine, loading the decoded uint8 tensors back well under one.

One file per source and decoding variant, under ``data.cache_dir``, else ``$LONGTAIL_CACHE``, else
``~/.cache/longtail``. The key is the source's resolved path, size and modification time (for a folder,
a hash of its sorted listing: every file's relative path, size and modification time), so a changed
source is decoded again — also when images only moved between class folders or a class was renamed. Files are written atomically (temporary file + ``os.replace``), so concurrent runs never read a
half-written cache, and read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch

from longtail.data.sources import Decoded, Listed

__all__ = ["cache_root", "source_key", "load_or_build", "load_or_check", "load_or_list"]

CACHE_FORMAT = 2  # bump when the stored layout or the decoding changes


def cache_root(configured: str | None = None) -> Path:
    """``configured``, else ``$LONGTAIL_CACHE``, else ``~/.cache/longtail``."""
    return Path(configured or os.environ.get("LONGTAIL_CACHE") or Path.home() / ".cache" / "longtail").expanduser()


def _fingerprint(path: Path) -> str:
    path = path.resolve()
    if path.is_dir():
        listing = hashlib.sha256()
        for folder, dirs, files in os.walk(path):
            dirs.sort()
            for name in sorted(files):
                full = os.path.join(folder, name)
                info = os.stat(full)
                listing.update(f"{os.path.relpath(full, path)}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
        return f"{path}|dir|{listing.hexdigest()}"
    info = path.stat()
    return f"{path}|{info.st_size}|{info.st_mtime_ns}"


def source_key(sources: Sequence[Path], variant: str) -> str:
    """Identity of the decoded data: every source path's fingerprint plus how it was decoded."""
    return "\n".join([f"format {CACHE_FORMAT}", variant, *(_fingerprint(Path(s)) for s in sources)])


def _listing_key(paths: Sequence[str]) -> str | None:
    """Hash of every file's path, size and modification time; None when one is missing."""
    listing = hashlib.sha256()
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            return None
        listing.update(f"{path}\0{info.st_size}\0{info.st_mtime_ns}\n".encode())
    return listing.hexdigest()


def _write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the cache file {path} ({error}); the next run does this work again. "
                      "Set data.cache_dir or $LONGTAIL_CACHE to a writable folder", stacklevel=3)


Headers = tuple[dict[str, str], list[tuple[int, int]]]


def load_or_check(paths: Sequence[str], check: Callable[[Sequence[str]], Headers],
                  cache_dir: str | None = None) -> Headers:
    """``check(paths)`` (unreadable file -> reason, and the distinct image sizes), remembered for this
    exact listing (every path, size and modification time), so a large file set is checked once, not at
    every run."""
    key = _listing_key(paths)
    if key is None:  # a missing file: check now, it is named in the result
        return check(paths)
    path = cache_root(cache_dir) / f"headers-{key[:24]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return dict(stored["unreadable"]), [tuple(size) for size in stored["sizes"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged or older cache file is checked again, never trusted
    bad, sizes = check(paths)
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps({"unreadable": bad, "sizes": sizes})))
    return bad, sizes


def load_or_list(source: Path, build: Callable[[], Listed], cache_dir: str | None = None) -> Listed:
    """The listing of an archive (member names, targets, image sizes; ``sources.list_archive``),
    remembered for the archive's path, size and modification time: the listing pass reads the whole
    archive, a cached listing lets a run with a cached decode skip it."""
    key = source_key([source], "listing")
    path = cache_root(cache_dir) / f"listing-{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            if stored["key"] == key:
                return Listed(stored["class_names"], stored["paths"],
                              {split: torch.tensor(t, dtype=torch.int64) for split, t in stored["targets"].items()},
                              [tuple(size) for size in stored["sizes"]])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache file is listed again, never trusted
    listed = build()
    state = {"key": key, "class_names": listed.class_names, "paths": listed.paths,
             "targets": {split: t.tolist() for split, t in listed.targets.items()}, "sizes": listed.sizes}
    _write_atomic(path, lambda tmp: tmp.write_text(json.dumps(state)))
    return listed


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
    _write_atomic(path, lambda tmp: torch.save({"key": key, "data": decoded.to_state()}, tmp))
    return decoded
