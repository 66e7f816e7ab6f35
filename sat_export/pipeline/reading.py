"""The reader side of a run: one input read, decoded and preprocessed (``read_item``: every way a file can be bad
becomes an error, never an exception), read-ahead bounded in items and bytes (``prefetch``) and batching that
never holds error rows back (``batches``). Readers run on a thread pool (Pillow releases the GIL)."""
from __future__ import annotations

import io
import stat
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor
from dataclasses import dataclass, replace
from typing import BinaryIO

import numpy as np
from PIL import Image

from sat_export.faults import INPUT, IO, StorageUnavailable, error_kind
from sat_export.pipeline.inputs import InputItem
from sat_export.pipeline.stages import StageTimes, TimedFile
from training.config import PreprocessConfig
from training.errors import ImageDecodeError, first_line
from training.images import DEFAULT_MAX_PIXELS, load_rgb, preprocess


@dataclass
class Loaded:
    """One item after the reader: its model input, or why there is none."""

    item: InputItem
    pixels: np.ndarray | None  # (3, crop, crop) float32
    error: str | None
    thumbnail: Image.Image | None = None  # kept for overlays only
    error_kind: str = IO  # of ``error`` (``sat_export.faults``)


def read_item(item: InputItem, cfg: PreprocessConfig, max_pixels: int = DEFAULT_MAX_PIXELS,
              thumbnail: int | None = None, full_decode: bool = False, times: StageTimes | None = None) -> Loaded:
    """Read, decode (at reduced size where ``cfg`` allows, unless ``full_decode``) and preprocess one
    item; every way a file can be bad becomes ``Loaded.error``. The result keeps no encoded bytes (``data``).

    With ``thumbnail``, the decoded image is also kept, shrunk to at most that many pixels a side. With
    ``times``, opening and reading the file counts as ``read``, the rest as ``decode_image``.
    """
    kept = replace(item, data=None) if item.data is not None else item
    if item.error is not None:
        return Loaded(kept, None, item.error, error_kind=item.error_kind)
    times = times or StageTimes(enabled=False)
    start = time.perf_counter()
    f = None
    try:
        f = _open_image(item)  # opened here so a permission error reads as one; Pillow reads lazily
        if times.enabled:
            f = TimedFile(f, time.perf_counter() - start)
        with f:
            image = load_rgb(f, max_pixels, None if full_decode else cfg.draft_short_side)
        pixels = preprocess(image, cfg)
        if thumbnail is None:
            return Loaded(kept, pixels, None)
        image.thumbnail((thumbnail, thumbnail))
        return Loaded(kept, pixels, None, image)
    except ImageDecodeError as err:
        return Loaded(kept, None, str(err), error_kind=INPUT)
    except OSError as err:
        return Loaded(kept, None, f"cannot read file: {err.strerror or err}", error_kind=error_kind(err))
    except StorageUnavailable as err:  # a remote image's host failed past the budget: this row, not the run
        return Loaded(kept, None, f"cannot read file: {err}", error_kind=IO)
    except Exception as err:  # noqa: BLE001 - a decoder plugin bug on one file must not stop the run
        return Loaded(kept, None, f"cannot decode image: {type(err).__name__}: {first_line(err)}", error_kind=INPUT)
    finally:
        read = f.seconds if isinstance(f, TimedFile) else 0.0
        times.add("read", read)
        times.add("decode_image", time.perf_counter() - start - read)


def _open_image(item: InputItem) -> BinaryIO:
    """The item's encoded image as a binary file: its bytes from a shard, its object, or its regular file."""
    if item.data is not None:
        if not item.data:
            raise ImageDecodeError("empty image (0 bytes)")
        return io.BytesIO(item.data)
    if item.opener is not None:
        return item.opener()
    info = item.path.stat()
    if stat.S_ISDIR(info.st_mode):
        raise ImageDecodeError("is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
        raise ImageDecodeError("not a regular file")
    if info.st_size == 0:
        raise ImageDecodeError("empty file (0 bytes)")
    return item.path.open("rb")


def prefetch(pool: Executor, fn: Callable, items: Iterable, depth: int, max_bytes: int | None = None) -> Iterator:
    """``map(fn, items)`` on ``pool``, in order, with at most ``depth`` calls submitted ahead and, with
    ``max_bytes``, at most that many encoded bytes (``InputItem.data``) among them; one always goes ahead."""
    pending: deque = deque()
    held = 0
    for item in items:
        size = len(getattr(item, "data", None) or b"")
        while pending and (len(pending) >= depth or max_bytes is not None and held + size > max_bytes):
            future, done_size = pending.popleft()
            held -= done_size
            yield future.result()
        pending.append((pool.submit(fn, item), size))
        held += size
    while pending:
        yield pending.popleft()[0].result()


def batches(loaded: Iterable[Loaded], batch_size: int) -> Iterator[list[Loaded]]:
    """Consecutive runs of items holding ``batch_size`` decodable images (plus the bad ones between), or
    ``batch_size`` bad ones: error rows are written as they come, not held until good images fill a batch."""
    batch: list[Loaded] = []
    n_good = 0
    for entry in loaded:
        batch.append(entry)
        n_good += entry.pixels is not None
        if n_good == batch_size or len(batch) - n_good == batch_size:
            yield batch
            batch, n_good = [], 0
    if batch:
        yield batch
