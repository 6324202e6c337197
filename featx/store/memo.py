"""A small on-disk index of facts that are slow to find and cheap to check, so a warm command stays light.

A weights file's SHA-256 goes into every cache key; hashing 100 MB of ResNet-50 weights on each call, or
importing torchvision to learn a weights file's name, would cost more than finding the cached file; so would
hashing every image for the dataset's fingerprint. The index remembers them in ``~/.cache/featx/memo.json``
(``$FEATX_HOME`` or ``$XDG_CACHE_HOME/featx`` where set). A hash is remembered with the sizes and times of what
it hashed and recomputed when any changes; a lost or unreadable index is only a slower start.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Callable

MAX_ENTRIES = 1000


def memo_path() -> Path:
    home = os.environ.get("FEATX_HOME")
    if home:
        return Path(home) / "memo.json"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "featx" / "memo.json"


def _read() -> dict[str, str]:
    try:
        entries = json.loads(memo_path().read_text())
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write(entries: dict[str, str]) -> None:
    """Atomically, keeping the newest entries; a read-only home just means nothing is remembered."""
    path, handle = memo_path(), None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as handle:
            json.dump(dict(list(entries.items())[-MAX_ENTRIES:]), handle)
        os.replace(handle.name, path)
    except OSError:  # the memo a folder, the disk full: no leftover temporary file either
        if handle is not None:
            Path(handle.name).unlink(missing_ok=True)


def remembered(key: str, find: Callable[[], str]) -> str:
    """The value remembered for ``key``, or ``find()``'s, remembered from now on."""
    entries = _read()
    if key not in entries:
        entries[key] = find()
        _write(entries)
    return entries[key]


def remembered_of_file(kind: str, path: str | Path, find: Callable[[], str]) -> str:
    """A ``kind`` of fact about the file ``path`` (a weights file's hash, a checkpoint's), found again when its size,
    modification or change time changed: a file replaced in place with its old size and an old modification time
    put back still moves the change time, which no program sets."""
    path = Path(path).resolve()
    stat = path.stat()
    return remembered(f"{kind}:{path}:{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}", find)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remembered_sha256(path: str | Path) -> str:
    return remembered_of_file("sha256", path, lambda: file_sha256(path))


def stale_entries() -> list[str]:
    """Keys of facts about files that are gone or changed since (a file's hash or check, a dataset folder's
    fingerprint): they can never be asked for again."""
    stale = []
    for key in _read():
        kind, _, rest = key.partition(":")
        if kind == "dataset":
            if not Path(rest.rsplit(":", 1)[0]).is_dir():
                stale.append(key)
        elif rest.count(":") >= 3:  # remembered_of_file: kind:path:size:mtime:ctime
            path, size, mtime, ctime = rest.rsplit(":", 3)
            try:
                stat = Path(path).stat()
            except OSError:
                stale.append(key)
                continue
            if f"{stat.st_size}:{stat.st_mtime_ns}:{stat.st_ctime_ns}" != f"{size}:{mtime}:{ctime}":
                stale.append(key)
    return stale


def forget(keys: list[str]) -> None:
    """Drop ``keys`` from the index."""
    entries = _read()
    for key in keys:
        entries.pop(key, None)
    _write(entries)
