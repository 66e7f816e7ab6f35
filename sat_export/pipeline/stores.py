"""Stores behind URLs: fsspec filesystems with their timeouts and retries set, and one object fetched whole.

``filesystem`` builds a URL's filesystem with the run's ``SourceOptions``: the connect and read timeouts and the
libraries' own retries are set where the client has the knobs, and the user's ``--storage-options`` go on top:

- ``s3://`` (s3fs over botocore): ``config_kwargs`` ``connect_timeout`` / ``read_timeout`` and botocore's
  ``standard`` retry mode with ``S3_ATTEMPTS`` tries per request (its backoff for throttling and 5xx). s3fs
  tries each call up to ``S3FileSystem.retries`` (5) times itself (a class attribute, not an option), so a
  stalled store reaches ``sat_export.faults.Retrying`` after at most 5 x ``S3_ATTEMPTS`` x the read timeout;
  that retries within ``--retry-for`` and continues the shard where it broke.
- ``http(s)://`` (aiohttp): a ``ClientTimeout`` with ``sock_connect`` and ``sock_read`` in ``client_kwargs``.

``fetch`` reads one remote image whole, at most ``max_sample_bytes``, within connect + read timeout in all (a
server that drips a byte at a time is cut off too), retried per host (``Retrying.call``).
"""
from __future__ import annotations

import io
from typing import Any
from urllib.parse import urlsplit

from sat_export.errors import InputError
from sat_export.faults import Retrying
from sat_export.options import SourceOptions
from training.errors import ImageDecodeError, first_line

S3_ATTEMPTS = 2  # botocore's tries of one request ("standard" mode)


def is_url(raw: object) -> bool:
    return "://" in str(raw)


def protocols(fs) -> tuple[str, ...]:
    """The URL schemes an fsspec filesystem answers to (``("file", "local")``, ``("s3", "s3a")``...)."""
    return fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)


def scheme(url: str) -> str:
    """``s3://b/k`` -> ``s3``; a chained URL (``zip://x::file://y``) is named by its first scheme."""
    return url.partition("://")[0].lower() if is_url(url) else "file"


def store_options(protocol: str, sources: SourceOptions) -> dict:
    """fsspec's options for a ``protocol`` filesystem: the timeouts and retries above, ``sources.storage_options``
    on top (its ``config_kwargs`` / ``client_kwargs`` merged key by key, so they keep the timeouts they do not set)."""
    if protocol in ("s3", "s3a"):
        defaults: dict[str, Any] = {"config_kwargs": {
            "connect_timeout": sources.connect_timeout, "read_timeout": sources.read_timeout,
            "retries": {"mode": "standard", "max_attempts": S3_ATTEMPTS}}}
    elif protocol in ("http", "https"):
        import aiohttp

        defaults = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(sock_connect=sources.connect_timeout,
                                                                       sock_read=sources.read_timeout)}}
    else:
        defaults = {}
    merged = {**defaults, **sources.storage_options}
    for nested in ("config_kwargs", "client_kwargs"):
        if isinstance(sources.storage_options.get(nested), dict) and nested in defaults:
            merged[nested] = {**defaults[nested], **sources.storage_options[nested]}
    return merged


def filesystem(raw: str, sources: SourceOptions = SourceOptions()) -> tuple[Any, str]:
    """``fsspec.core.url_to_fs``: the filesystem of ``raw`` (``store_options``; credentials from
    ``sources.storage_options`` or the standard variables, e.g. ``AWS_*`` for s3fs) and the path on it.

    Raises ``InputError`` in one line for a URL no filesystem can be built for: a missing driver, or a
    constructor that fails (fsspec's drivers raise anything: ``TypeError`` for missing arguments, ``OSError``
    when they connect at once)."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(raw, **store_options(scheme(raw), sources))
    except ImportError as err:
        raise InputError(f"{raw}: cannot open this URL ({err}); for s3:// install 'sat-export[s3]'") from None
    except Exception as err:  # noqa: BLE001 - any driver's constructor: one line, never its traceback
        raise InputError(f"{raw}: cannot open this URL ({type(err).__name__}: {first_line(err)})") from None


def host_of(url: str) -> str:
    """The store a URL is on, as retries share incidents: ``https://example.com``, ``s3://bucket``."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def fetch(fs, path: str, sources: SourceOptions, retrying: Retrying) -> io.BytesIO:
    """``path`` on ``fs`` read whole, within connect + read timeout in all and retried per host; more than
    ``sources.max_sample_bytes`` is refused (``ImageDecodeError``) having read at most one byte past it."""
    url = fs.unstrip_protocol(path)
    limit = sources.max_sample_bytes
    deadline = {"timeout": sources.connect_timeout + sources.read_timeout} if fs.async_impl else {}
    data = retrying.call(lambda: fs.cat_file(path, start=0, end=limit + 1, **deadline), url, host_of(url))
    if len(data) > limit:
        raise ImageDecodeError(over_limit("the image", None, limit))
    return io.BytesIO(data)


def over_limit(what: str, size: int | None, limit: int) -> str:
    """An error row's words for an object over ``--max-sample-bytes`` (``size`` None: not known)."""
    has = f" is {size:,} bytes," if size is not None else " is"
    return f"{what}{has} over the limit of {limit:,} bytes (--max-sample-bytes)"
