"""What ``sat-infer`` writes: rows, the run record beside them, and the lock that lets one run write.

``--out`` is validated before it is touched: every complete line must be a sat-infer row and, when
the caller gives its settings, ``<out>.run.json`` must record the same ones; only then is a torn
last line (a run killed mid-write) cut off. Anything else is refused in one line with the file
byte-for-byte as it was. ``<out>.lock`` keeps a second run off the same output.

Rows are UTF-8 JSON lines. A file name that is not valid UTF-8 reaches Python with each
undecodable byte 0xXY as the lone surrogate U+DCXY (PEP 383, ``surrogateescape``); a row writes
it as the JSON escape ``\\udcXY``, so ``json.loads`` then ``os.fsencode`` give the original bytes
back, and resuming finds the same file.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from sat_export.errors import OutputError
from sat_export.faults import IO
from training.files import write_atomically

ROW_START = b'{"image": '  # every row is rendered with its key first


def row_line(row: dict) -> bytes:
    """One JSON line in UTF-8; a lone surrogate (an undecodable file name byte) becomes its ``\\udcXY``
    escape, which is what it means inside a JSON string."""
    return json.dumps(row, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n"


def is_row(row: object) -> bool:
    """A caption row (``image``, ``caption``, ``tokens``) or an error row (``image``, ``error``)."""
    return (isinstance(row, dict) and isinstance(row.get("image"), str)
            and (isinstance(row.get("error"), str)
                 or isinstance(row.get("caption"), str) and isinstance(row.get("tokens"), list)))


def check_output_paths(out: Path, folders: Iterable[Path | None] = ()) -> None:
    """Refuse, before anything is read or written, an ``out`` that is not a regular file (a folder, a
    FIFO, a broken link) and ``folders`` (``--alphas``, ``--overlays``) that exist but are not folders.

    Raises
    ------
    OutputError
        One line naming the path and what it is.
    """
    if out.is_symlink() and not out.exists():
        raise OutputError(f"{out}: a symlink to nothing; --out names the JSONL file to write")
    if out.is_dir():
        raise OutputError(f"{out}: is a folder; --out names the JSONL file to write (e.g. {out / 'captions.jsonl'})")
    if out.exists() and not out.is_file():
        raise OutputError(f"{out}: not a regular file (a FIFO or device?); --out names the JSONL file to write")
    _check_creatable(out)
    for folder in filter(None, folders):
        if folder.exists() and not folder.is_dir():
            raise OutputError(f"{folder}: is a file, not a folder; --alphas and --overlays name folders to write into")
        _check_creatable(folder)


def _check_creatable(path: Path) -> None:
    """The nearest existing ancestor of ``path`` is a folder (else ``mkdir`` would fail mid-run)."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{path}: cannot be created: {parent} is a file, not a folder")


def lock_path(out: Path) -> Path:
    return out.with_name(out.name + ".lock")


class OutputLock:
    """An exclusive lock on ``<out>.lock`` for a whole run; the file holds the holder's pid.

    ``fcntl.flock`` rather than the ``filelock`` package: filelock opens the lock file with
    ``O_TRUNC`` on every attempt, so a refused run would erase the pid it must name. The kernel
    drops the lock when its holder exits, ``kill -9`` included, and the descriptor is not inherited
    by the programs a run starts. The file stays after the run (it only holds the last pid).

    Raises
    ------
    OutputError
        Another process holds the lock (its pid named), or the lock file is a link or not a regular file.
    """

    def __init__(self, out: Path):
        self.path = lock_path(out)
        try:  # O_NOFOLLOW: a planted link must not make us write a pid into another file
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as err:
            what = "it is a symlink" if err.errno == errno.ELOOP else err.strerror
            raise OutputError(f"{self.path}: cannot open the lock file ({what})") from None
        self._file = os.fdopen(fd, "r+b", buffering=0)  # closed (lock dropped) by release, or by the GC
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OutputError(f"{self.path}: the lock file is not a regular file")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._file.read(32).decode(errors="replace").strip() or "unknown"
            self.release()
            raise OutputError(f"{out}: another sat-infer run (pid {holder}) is writing it; wait for it to end "
                              "or choose another --out") from None
        except BaseException:
            self.release()
            raise
        self._file.truncate(0)
        self._file.write(f"{os.getpid()}\n".encode())

    def release(self) -> None:
        self._file.close()


def run_record_path(out: Path) -> Path:
    """``captions.jsonl`` -> ``captions.jsonl.run.json``: what produced the rows of ``out``."""
    return out.with_name(out.name + ".run.json")


def _check_run_record(out: Path, settings: dict) -> None:
    """Refuse to resume ``out``'s rows when ``<out>.run.json`` is missing or records other ``settings``."""
    record = run_record_path(out)
    if not record.is_file():
        raise OutputError(f"{out}: holds rows but no {record.name} says which run made them; pass --overwrite "
                          "to start over or choose another --out")
    try:
        before = json.loads(record.read_bytes())
    except (OSError, ValueError, RecursionError):
        before = None
    if not isinstance(before, dict):
        raise OutputError(f"{record}: unreadable run record; pass --overwrite to start over")
    refuse_other_settings(out, before, settings)


UNRECORDED = {"precision": "fp32"}  # what records written before these settings were recorded mean by leaving them out


def refuse_other_settings(out: str | Path, before: dict, settings: dict) -> None:
    """``OutputError`` naming each setting that differs (one recorded on one side only differs too, except one of
    ``UNRECORDED`` left out of ``before``, which has its value there)."""
    before = {**UNRECORDED, **before}
    changed = [f"{key} {before.get(key)!r} -> {settings.get(key)!r}" for key in dict.fromkeys([*settings, *before])
               if before.get(key) != settings.get(key)]
    if changed:
        raise OutputError(f"{out}: its rows were made with other settings ({'; '.join(changed)}); pass "
                          "--overwrite to start over or choose another --out")


def _write_run_record(out: Path, settings: dict) -> None:
    """Record beside ``out`` the settings its rows are made with (``write_atomically``)."""
    write_atomically(run_record_path(out), lambda f: f.write((json.dumps(settings, indent=1) + "\n").encode()))


def resume_output(out: Path, overwrite: bool = False, settings: dict | None = None,
                  retry_errors: bool = False) -> dict[str, bool]:
    """Validate ``out``, then prepare it for appending; map the key of each row it holds to "is an error row".

    Nothing is changed unless every complete line is a row, a torn last line starts like one and,
    with ``settings`` (what the rows of this run depend on), ``<out>.run.json`` records the same
    settings. Then the torn line is cut off (or with ``overwrite`` the file is emptied), with ``retry_errors``
    the error rows of kind ``io`` are taken out (``out`` rewritten atomically: one row per item stays true
    whenever the run stops) so their items are captioned again, and, with ``settings``, the record is
    (re)written.

    Raises
    ------
    OutputError
        ``out`` is not sat-infer output, or was made with other settings (it is left byte-for-byte as
        it was), or cannot be read or written.
    """
    try:
        size = out.stat().st_size if out.exists() else None
        done, complete = _read_rows(out) if size else ({}, 0)
        if settings is not None and size and not overwrite:
            _check_run_record(out, settings)
        if size is None or overwrite or complete < size:
            with out.open("r+b" if size is not None else "wb") as f:
                f.truncate(0 if overwrite else complete)
        if retry_errors and not overwrite and any(done.values()):
            for key in _drop_io_rows(out):
                del done[key]
        if settings is not None:
            _write_run_record(out, settings)
    except OSError as err:
        raise OutputError(f"{err.filename or out}: cannot prepare the output ({err.strerror or err})") from None
    return {} if overwrite else done


def _drop_io_rows(out: Path) -> list[str]:
    """Rewrite ``out`` (``write_atomically``) without its error rows of kind ``io``; their keys. Error rows written
    before rows had a kind are kept."""
    dropped: list[str] = []

    def write(sink: BinaryIO) -> None:
        with out.open("rb") as rows:
            for line in rows:
                row = json.loads(line)
                if "error" in row and row.get("error_kind") == IO:
                    dropped.append(row["image"])
                else:
                    sink.write(line)

    if out.is_file():
        write_atomically(out, write)
    return dropped


def _read_rows(out: Path) -> tuple[dict[str, bool], int]:
    """The rows of ``out`` (key -> is an error row) and the length of its complete lines; reads only."""
    done: dict[str, bool] = {}
    complete = 0
    with out.open("rb") as f:
        for number, line in enumerate(f, 1):
            if not line.endswith(b"\n"):  # torn: only a row's beginning may be cut off
                if not ROW_START.startswith(line[:len(ROW_START)]):
                    raise _not_ours(out, "its last line is not a sat-infer row")
                break
            if not line.startswith(ROW_START):
                raise _not_ours(out, f"line {number} is not a sat-infer row")
            try:
                row = json.loads(line)
            except (ValueError, RecursionError):
                row = None
            if not is_row(row):
                raise _not_ours(out, f"line {number} is not a sat-infer row")
            done[row["image"]] = "error" in row
            complete += len(line)
    return done, complete


def _not_ours(out: Path, what: str) -> OutputError:
    return OutputError(f"{out}: {what}: not a sat-infer output, left as it is; choose another --out")


def whole_rows(path: Path) -> int:
    """The rows of ``path`` that are on disk whole (ended by their line feed), as a rerun resumes them."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
