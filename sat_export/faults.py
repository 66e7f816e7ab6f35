"""What a failure means for a run, decided in one place: retry it, record it as an error row, or stop.

Readers, writers and the Ray driver ask this module; nobody else decides which exceptions are worth a retry.

- ``transient(err)``: the environment failed and may recover (connection refused or reset, timeouts, HTTP 5xx,
  429 / SlowDown, an incomplete read, a lost Ray worker or node). Retried with exponential backoff and full
  jitter for at most ``RetryPolicy.retry_for`` seconds per incident (``Retrying``). A stall is a timeout: the
  stores' connect and read timeouts default to ``DEFAULT_CONNECT_TIMEOUT`` and ``DEFAULT_READ_TIMEOUT``.
- ``error_kind(err)``: the ``error_kind`` of the error row an item gets when it cannot be captioned: ``"input"``
  (the bytes are bad: undecodable, too large, no image; never retried) or ``"io"`` (it could not be read:
  network, permission, missing; ``sat-infer --retry-errors`` redoes these).

Exceptions are matched by the names of their classes (``botocore.exceptions.EndpointConnectionError``), so no
storage or cluster library is imported here, and through their ``__cause__``/``__context__`` chain, because
s3fs, fsspec and pyarrow re-raise a library's error as an ``OSError`` of their own; a Ray task's error is judged by
the error it carries (``unwrap``).
"""
from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from training.errors import SatError, first_line

T = TypeVar("T")

INPUT, IO = "input", "io"  # the two kinds of error rows
DEFAULT_RETRY_FOR = 300.0  # seconds one incident may be retried (``--retry-for``)
DEFAULT_CONNECT_TIMEOUT = 10.0  # seconds to connect to a store or image host (``--connect-timeout``)
DEFAULT_READ_TIMEOUT = 20.0  # seconds a store may keep silent mid-request (``--read-timeout``)

# Errors of storage and network clients that a later try may not meet (matched on any class of the error's MRO).
TRANSIENT_CLASSES = frozenset({
    "botocore.exceptions.EndpointConnectionError", "botocore.exceptions.ConnectTimeoutError",
    "botocore.exceptions.ReadTimeoutError", "botocore.exceptions.ConnectionClosedError",
    "botocore.exceptions.ResponseStreamingError", "botocore.exceptions.IncompleteReadError",
    "botocore.exceptions.ConnectionError", "botocore.exceptions.HTTPClientError",
    "aiohttp.client_exceptions.ClientConnectionError", "aiohttp.client_exceptions.ClientPayloadError",
    "aiohttp.client_exceptions.ServerTimeoutError", "aiohttp.client_exceptions.ServerDisconnectedError",
    "http.client.IncompleteRead", "http.client.RemoteDisconnected",
    "urllib3.exceptions.ProtocolError", "urllib3.exceptions.TimeoutError",
    "requests.exceptions.ConnectionError", "requests.exceptions.Timeout", "requests.exceptions.ChunkedEncodingError",
    "fsspec.exceptions.FSTimeoutError",
    "ray.exceptions.RayActorError", "ray.exceptions.ActorUnavailableError", "ray.exceptions.WorkerCrashedError",
    "ray.exceptions.NodeDiedError", "ray.exceptions.ObjectLostError", "ray.exceptions.OwnerDiedError",
    "ray.exceptions.ObjectFetchTimedOutError", "ray.exceptions.LocalRayletDiedError",
})
# A server's answer that says "later": throttling and server-side failures (S3 error codes, HTTP statuses).
TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
                             "TooManyRequestsException", "RequestTimeout", "InternalError", "ServiceUnavailable"})
# OSError errnos of a remote or network failure (s3fs maps S3's 500 to EREMOTEIO and 503 / SlowDown to EBUSY).
TRANSIENT_ERRNOS = frozenset({errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED,
                              errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EPIPE,
                              errno.EAGAIN, errno.EBUSY, getattr(errno, "EREMOTEIO", errno.EIO)})
# Errors whose meaning is that the bytes read are bad (the item's ``input``), where not a decode error already.
INPUT_CLASSES = frozenset({"tarfile.TarError", "zlib.error", "EOFError", "gzip.BadGzipFile",
                           "pyarrow.lib.ArrowInvalid", "UnicodeDecodeError", "PIL.UnidentifiedImageError",
                           "training.errors.ImageDecodeError", "PIL.Image.DecompressionBombError"})


class StorageUnavailable(SatError):
    """A store or cluster kept failing past the retry budget; the message names what and the last error."""


def unwrap(err: BaseException) -> BaseException:
    """The error a Ray task raised (``RayTaskError.cause``, however deep), else ``err`` itself.

    ``ray.get`` raises a task's error as a class deriving from both ``RayTaskError`` and the error's own class,
    whose message is the worker's whole traceback: its ``cause`` is the error as it was raised.
    """
    while "ray.exceptions.RayTaskError" in _class_names(err) and isinstance(getattr(err, "cause", None),
                                                                           BaseException):
        err = err.cause
    return err


def _chain(err: BaseException) -> Iterator[BaseException]:
    """``err`` (``unwrap``ped), then what it was raised from or during, each once."""
    seen: set[int] = set()
    err = unwrap(err)
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        yield err
        err = err.__cause__ or err.__context__
        err = err if err is None else unwrap(err)


def _class_names(err: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__qualname__}".removeprefix("builtins.") for cls in type(err).__mro__}


def _http_status(err: BaseException) -> int | None:
    """The HTTP status an error carries: aiohttp's ``status``, requests' ``response.status_code``, botocore's
    ``response["ResponseMetadata"]["HTTPStatusCode"]``."""
    status = getattr(err, "status", None) or getattr(getattr(err, "response", None), "status_code", None)
    response = getattr(err, "response", None)
    if status is None and isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return status if isinstance(status, int) else None


def _error_code(err: BaseException) -> str | None:
    response = getattr(err, "response", None)
    return response.get("Error", {}).get("Code") if isinstance(response, dict) else None


def _transient_one(err: BaseException) -> bool:
    if isinstance(err, (ConnectionError, TimeoutError)) or _class_names(err) & TRANSIENT_CLASSES:
        return True
    status = _http_status(err)
    if status is not None and (status >= 500 or status == 429):
        return True
    if _error_code(err) in TRANSIENT_CODES:
        return True
    return isinstance(err, OSError) and err.errno in TRANSIENT_ERRNOS


def transient(err: BaseException) -> bool:
    """Whether ``err``, or an error it was raised from, is a failure of the environment that may pass."""
    return not isinstance(unwrap(err), SatError) and any(_transient_one(e) for e in _chain(err))


def _undecodable(err: BaseException) -> bool:
    """pyarrow reports bytes it cannot decode (a corrupt page or footer) as a bare ``OSError``: no errno, no cause;
    the operating system's and the stores' clients' ``OSError`` carry an errno or the error they came from."""
    return type(err) is OSError and err.errno is None and err.__cause__ is None and err.__context__ is None


def error_kind(err: BaseException) -> str:
    """``"input"`` when ``err`` says the bytes are bad, else ``"io"`` (they could not be read)."""
    if transient(err):
        return IO
    bad = any(_class_names(e) & INPUT_CLASSES or _undecodable(e) for e in _chain(err))
    return INPUT if bad else IO


@dataclass(frozen=True)
class RetryPolicy:
    """How long one incident of transient failures is retried: ``retry_for`` seconds in all (0: never), waits
    doubling from ``first_delay`` up to ``max_delay``, each drawn at random below that bound (full jitter)."""

    retry_for: float = DEFAULT_RETRY_FOR
    first_delay: float = 0.5
    max_delay: float = 30.0


class Retrying:
    """One run's retries under one ``RetryPolicy``, counted (``retries``) across threads for the run's summary."""

    def __init__(self, policy: RetryPolicy = RetryPolicy(), sleep: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic):
        self.policy, self._sleep, self._clock = policy, sleep, clock
        self._lock = threading.Lock()
        self._hosts: dict[str, Incident] = {}
        self.retries = 0

    def incident(self, what: str) -> Incident:
        """A new incident on ``what`` (a shard's or object's name): call its ``failed(err)`` on each error."""
        return Incident(self, what)

    def call(self, fn: Callable[[], T], what: str, host: str | None = None) -> T:
        """``fn()``, retried while it fails transiently within the budget; other errors propagate as they are.

        With ``host`` (``what``'s store, e.g. ``https://example.com``), the failures of every call on it, from
        any thread, are one incident until a call succeeds: once a host has failed for the whole budget, each
        later call on it raises ``StorageUnavailable`` after one try instead of waiting the budget again.
        """
        incident = self.incident(what) if host is None else self._host_incident(host)
        while True:
            try:
                result = fn()
            except Exception as err:  # noqa: BLE001 - ``failed`` re-raises what is not transient
                incident.failed(err)
                continue
            if host is not None:
                with self._lock:
                    self._hosts.pop(host, None)
            return result

    def _host_incident(self, host: str) -> Incident:
        with self._lock:
            return self._hosts.setdefault(host, Incident(self, host, stops_run=False))


class Incident:
    """Consecutive transient failures of one thing: ``failed(err)`` waits before the next try, or raises."""

    def __init__(self, retrying: Retrying, what: str, stops_run: bool = True):
        self.retrying, self.what, self.stops_run = retrying, what, stops_run
        self.started: float | None = None
        self.tries = 0

    def failed(self, err: BaseException) -> None:
        """Wait the next backoff delay, or raise: ``err`` itself when it is not transient, ``StorageUnavailable``
        (one line naming ``what`` and the store's last error; where it ``stops_run``, saying a rerun goes on)
        when the budget is spent."""
        if not transient(err):
            raise err
        retrying = self.retrying
        policy, now = retrying.policy, retrying._clock()
        with retrying._lock:  # an incident of a host is shared by the reader threads
            self.started = now if self.started is None else self.started
            left = policy.retry_for - (now - self.started)
            tries, bound = self.tries, min(policy.max_delay, policy.first_delay * 2 ** min(self.tries, 32))
            if left > 0:
                self.tries += 1
                retrying.retries += 1
        if left <= 0:
            rerun = "; rerun the same command to go on where this run stopped" if self.stops_run else ""
            cause = next(e for e in _chain(err) if _transient_one(e))  # the store's own error, not a wrapper's
            raise StorageUnavailable(f"{self.what}: {first_line(cause)} (still failing after {tries + 1} tries over "
                                     f"{now - self.started:.0f} s{rerun})") from None
        retrying._sleep(min(random.uniform(0, bound), left))
