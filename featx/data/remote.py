"""Images at URLs (``s3://``, ``gs://``, ``https://``, ``file://`` …), read through fsspec when it is installed.

Workers on other machines can then read a CSV dataset without a shared filesystem. Only reading is
remote: the cache is written to a local (or shared) folder.
"""

from __future__ import annotations

import re

from featx.errors import DataError

URL = re.compile(r"[a-zA-Z][a-zA-Z0-9+.\-]*://")


def is_url(path) -> bool:
    return isinstance(path, str) and URL.match(path) is not None


def _fsspec():
    try:
        import fsspec
    except ImportError:
        raise DataError("images at URLs need fsspec and its backend: pip install fsspec s3fs (or gcsfs, "
                        "aiohttp)") from None
    return fsspec


def read_bytes(url: str) -> bytes:
    """The file at ``url``; raises OSError as a local file would."""
    with _fsspec().open(url, "rb") as handle:
        return handle.read()


def state(url: str) -> str:
    """What the storage says identifies this version of the file: size and ETag (or modification time)."""
    try:
        fs, location = _fsspec().core.url_to_fs(url)
        info = fs.info(location)
    except OSError:
        return "-1\0-1"
    version = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified") or ""
    return f"{info.get('size', -1)}\0{version}"


def require_fsspec() -> None:
    """Refuse a dataset of URLs at scan time, in one line, when fsspec is missing."""
    _fsspec()
