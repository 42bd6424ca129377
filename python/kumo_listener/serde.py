"""Loading parameter files: ``kumo.serde.toml_load`` and ``json_load``.

A dynamic hook may load its file for every connection, as the seed's
example does (``return kumo.serde.toml_load(path)``). So what a file parsed
to is kept, keyed on the file's identity and modification (device, inode,
size, modification and change times): an unchanged file costs one ``stat``
and a copy; a changed or replaced one is read again by the next call.

A file modified less than :data:`SETTLING_SECONDS` ago is not trusted to
the cache (as git does with "racily clean" files): a second write within the
file system's timestamp granularity, of the same size, would go unseen. And
a file whose identity changed while it was read (rewritten in place) is read
again, so a half-written file is never what a later call gets from the
cache. Each call returns its own copy: a caller that changes what it got
does not change what the next one gets.
"""

from __future__ import annotations

import json
import os
import threading
import time
import tomllib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

SETTLING_SECONDS = 2.0
CAPACITY = 64
"""Files kept at most; the least recently loaded goes first."""
READ_ATTEMPTS = 3

Parser = Callable[[bytes], Any]
Identity = tuple[int, int, int, int, int]


def toml_load(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Parse a TOML file into a dict."""
    result: dict[str, Any] = _cache.load(path, _parse_toml)
    return result


def json_load(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file."""
    return _cache.load(path, _parse_json)


def _parse_toml(data: bytes) -> Any:
    return tomllib.loads(data.decode("utf-8"))


def _parse_json(data: bytes) -> Any:
    return json.loads(data)


def _identity(status: os.stat_result) -> Identity:
    return (status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns, status.st_ctime_ns)


def _copy(value: Any) -> Any:
    """A copy of the containers of a parsed document (its other values,
    strings, numbers and dates, are immutable)."""
    if type(value) is dict:
        return {key: _copy(item) for key, item in value.items()}
    if type(value) is list:
        return [_copy(item) for item in value]
    return value


class _ParsedFiles:
    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[str, Parser], tuple[Identity, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def load(self, path: str | os.PathLike[str], parse: Parser) -> Any:
        key = (os.fspath(path), parse)
        identity = _identity(os.stat(key[0]))
        with self._lock:
            cached = self._entries.get(key)
        if cached is not None and cached[0] == identity:
            return _copy(cached[1])
        identity, value = self._read(key[0], parse)
        if self._settled(identity):
            with self._lock:
                self._entries[key] = (identity, value)
                self._entries.move_to_end(key)
                while len(self._entries) > CAPACITY:
                    self._entries.popitem(last=False)
            return _copy(value)
        return value

    @staticmethod
    def _read(path: str, parse: Parser) -> tuple[Identity, Any]:
        """Parse the file, read again while it changes under the reader."""
        for _ in range(READ_ATTEMPTS - 1):
            with open(path, "rb") as file:
                before = _identity(os.fstat(file.fileno()))
                data = file.read()
                if _identity(os.fstat(file.fileno())) == before:
                    return before, parse(data)
        with open(path, "rb") as file:
            return _identity(os.fstat(file.fileno())), parse(file.read())

    @staticmethod
    def _settled(identity: Identity) -> bool:
        modified = max(identity[3], identity[4]) / 1e9
        return time.time() - modified >= SETTLING_SECONDS


_cache = _ParsedFiles()
