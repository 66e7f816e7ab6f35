"""A shard and the samples read from it: what the tar and Parquet readers share.

- ``Shard``: a shard's filesystem, path, name in rows, and what the run record keeps of it.
- ``SampleKeys``: every sample of a shard gets a key of its own. A key met again (a tar holding two samples
  named ``000001``, a Parquet ``key`` column with repeats or nulls) becomes ``<key>~2``, ``<key>~3``... (the
  next one free), in reading order: the same from one run to the next, so each sample has one row, its own
  alphas file, and a resumed run finds it done.
- ``resumable``: a reader's samples, read again from where it broke off when its store fails transiently.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from sat_export.faults import IO, Retrying
from sat_export.pipeline.inputs import InputItem

P = TypeVar("P")  # a reader's position in its shard
SHARD_SUFFIXES = {".tar": "tar", ".tgz": "tar", ".tar.gz": "tar", ".parquet": "parquet"}


@dataclass(frozen=True)
class Shard:
    """One shard: its filesystem and path on it, its name in rows, and its size and etag (the run record's)."""

    fs: Any  # an fsspec filesystem (picklable: Ray ships shards to workers)
    path: str
    name: str
    size: int | None = None
    etag: str | None = None
    error: str | None = None  # why it cannot be read at all (a missing object, a FIFO)
    error_kind: str = IO  # of ``error`` (``sat_export.faults``)

    @property
    def kind(self) -> str:
        return shard_kind(self.path) or "tar"

    @property
    def url(self) -> str:
        return self.fs.unstrip_protocol(self.path)


def shard_kind(name: str) -> str | None:
    """``tar``, ``parquet``, or None for a name that is not a shard's."""
    lower = name.lower()
    return next((kind for suffix, kind in SHARD_SUFFIXES.items() if lower.endswith(suffix)), None)


class SampleKeys:
    """The keys given so far in one shard; ``unique(key)`` is ``key`` the first time, then ``key~2``, ``key~3``..."""

    def __init__(self):
        self._given: set[str] = set()
        self._next: dict[str, int] = {}  # of a repeated key: the suffix to try next

    def unique(self, key: str) -> str:
        if key not in self._given:
            self._given.add(key)
            return key
        n = self._next.get(key, 2)
        while f"{key}~{n}" in self._given:
            n += 1
        self._next[key] = n + 1
        self._given.add(f"{key}~{n}")
        return f"{key}~{n}"


def sample_item(shard: Shard, key: str, **what) -> InputItem:
    """The item of sample ``key`` of ``shard``: its row key is ``<shard>/<key>``."""
    return InputItem(what.pop("path", None), f"{shard.name}/{key}", shard=shard.name, sample=key, **what)


def shard_error(shard: Shard, message: str, kind: str) -> InputItem:
    """The error item of a whole shard (or what is left of it): its row key is the shard's name."""
    return InputItem(None, shard.name, f"{shard.name}: {message}", shard=shard.name, error_kind=kind)


def resumable(shard: Shard, retrying: Retrying, read: Callable[[P], Iterator[tuple[InputItem, P]]],
              start: P) -> Iterator[InputItem]:
    """The items of ``read(start)``, which yields each with the position after it. When it fails transiently,
    ``read`` is called again from the position after the last item yielded, after a backoff; one incident lasts
    until an item comes (``Retrying``). Past the budget ``StorageUnavailable`` naming the shard; other errors
    propagate."""
    position, incident = start, None
    while True:
        try:
            for item, position in read(position):
                incident = None
                yield item
            return
        except Exception as err:  # noqa: BLE001 - ``failed`` re-raises what is not transient
            incident = incident or retrying.incident(shard.url)
            incident.failed(err)  # waits; or raises err itself, or StorageUnavailable past the budget
