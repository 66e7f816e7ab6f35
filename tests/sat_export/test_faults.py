"""sat_export.faults: real exceptions of the storage, network and cluster libraries are classified as their
documents say, and one incident is retried within its budget and no longer."""
import errno
import tarfile
import zlib

import aiohttp
import pyarrow as pa
import pytest
import ray.exceptions
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError
from s3fs.errors import translate_boto_error

from sat_export.errors import InputError
from sat_export.faults import INPUT, IO, RetryPolicy, Retrying, StorageUnavailable, error_kind, transient, unwrap
from training.errors import ImageDecodeError


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def raised_from(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as err:
            raise outer from err
    except BaseException as err:
        return err


@pytest.mark.parametrize("err", [
    ConnectionRefusedError(errno.ECONNREFUSED, "refused"), ConnectionResetError(), TimeoutError(),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), ReadTimeoutError(endpoint_url="http://x"),
    client_error("SlowDown", 503), client_error("InternalError", 500), client_error("Whatever", 502),
    translate_boto_error(client_error("SlowDown", 503)),  # s3fs: OSError(EBUSY) from the ClientError
    translate_boto_error(client_error("InternalError", 500)),
    aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("cut"),
    aiohttp.ClientResponseError(None, (), status=503), aiohttp.ClientResponseError(None, (), status=429),
    ray.exceptions.ActorDiedError(), ray.exceptions.NodeDiedError("node gone"),
    raised_from(pa.ArrowIOError("read failed"), EndpointConnectionError(endpoint_url="http://x")),
], ids=lambda e: type(e).__name__)
def test_a_failure_of_the_environment_is_transient_and_its_row_kind_io(err):
    assert transient(err)
    assert error_kind(err) == IO


@pytest.mark.parametrize("err", [
    FileNotFoundError(errno.ENOENT, "missing"), PermissionError(errno.EACCES, "denied"),
    translate_boto_error(client_error("NoSuchKey", 404)), translate_boto_error(client_error("AccessDenied", 403)),
    aiohttp.ClientResponseError(None, (), status=404),
], ids=lambda e: type(e).__name__)
def test_a_missing_or_forbidden_object_is_io_and_not_retried(err):
    assert not transient(err)
    assert error_kind(err) == IO


@pytest.mark.parametrize("err", [
    ImageDecodeError("cannot identify image file"), tarfile.ReadError("bad checksum"), zlib.error("bad data"),
    EOFError("compressed file ended"), pa.ArrowInvalid("Parquet magic bytes not found"),
    raised_from(ValueError("cannot read"), tarfile.ReadError("unexpected end of data")),
], ids=lambda e: type(e).__name__)
def test_bad_bytes_are_input_errors_and_not_retried(err):
    assert not transient(err)
    assert error_kind(err) == INPUT


def task_error(cause: BaseException) -> BaseException:
    """``cause`` as ``ray.get`` raises a remote task's error: a class of both ``RayTaskError`` and its own."""
    return ray.exceptions.RayTaskError("caption", "Traceback (most recent call last):\n  ...", cause).as_instanceof_cause()


def test_a_ray_task_error_is_judged_by_the_error_it_carries():
    lost = task_error(EndpointConnectionError(endpoint_url="http://x"))
    assert "\n" in str(lost) and "Could not connect" not in str(lost).splitlines()[0]  # the worker's traceback
    assert unwrap(lost) is lost.cause
    assert transient(lost) and error_kind(lost) == IO
    bad = task_error(tarfile.ReadError("bad checksum"))
    assert not transient(bad) and error_kind(bad) == INPUT
    ours = task_error(StorageUnavailable("s3://b/00000.tar: connection refused"))
    assert not transient(ours) and str(unwrap(ours)) == "s3://b/00000.tar: connection refused"
    assert unwrap(task_error(task_error(ValueError("deep")).cause)).args == ("deep",)


def test_our_own_errors_are_never_retried():
    assert not transient(raised_from(InputError("x: no such file"), ConnectionResetError()))


class FakeClock:
    def __init__(self):
        self.now, self.slept = 0.0, []

    def sleep(self, seconds):
        assert seconds >= 0
        self.slept.append(seconds)
        self.now += seconds

    def __call__(self):
        return self.now


def flaky(failures: list[BaseException], value="ok"):
    def fn():
        if failures:
            raise failures.pop(0)
        return value
    return fn


def test_a_transient_failure_is_retried_until_it_passes_and_counted():
    clock = FakeClock()
    retrying = Retrying(RetryPolicy(retry_for=60), clock.sleep, clock)
    assert retrying.call(flaky([ConnectionResetError(), TimeoutError()]), "s3://b/0.tar") == "ok"
    assert retrying.retries == 2 and len(clock.slept) == 2


def test_backoff_doubles_up_to_its_cap_and_the_budget_ends_the_incident_in_one_line():
    clock = FakeClock()
    retrying = Retrying(RetryPolicy(retry_for=100, first_delay=1, max_delay=8), clock.sleep, clock)
    with pytest.raises(StorageUnavailable) as caught:
        retrying.call(flaky([EndpointConnectionError(endpoint_url="http://127.0.0.1:1")] * 10_000), "s3://b/0.tar")
    message = str(caught.value)
    assert message.startswith("s3://b/0.tar: Could not connect") and "\n" not in message
    assert clock.now <= 100 and all(s <= 8 for s in clock.slept)
    assert all(s <= 2 ** i for i, s in enumerate(clock.slept))  # first_delay * 2**i bounds the i-th wait
    assert retrying.retries == len(clock.slept) > 10


def test_retry_for_zero_means_no_retry_and_other_errors_pass_through_at_once():
    clock = FakeClock()
    with pytest.raises(StorageUnavailable):
        Retrying(RetryPolicy(retry_for=0), clock.sleep, clock).call(flaky([ConnectionResetError()]), "x")
    with pytest.raises(FileNotFoundError):
        Retrying(RetryPolicy(), clock.sleep, clock).call(flaky([FileNotFoundError("gone")]), "x")
    assert clock.slept == []


def test_pyarrow_bytes_it_cannot_decode_are_input_errors():
    path = "/tmp/sat-faults-corrupt.parquet"
    import os

    import pyarrow.parquet as pq

    pq.write_table(pa.table({"jpg": [os.urandom(300) for _ in range(50)]}), path, compression="none")
    data = bytearray(open(path, "rb").read())
    offset = pq.ParquetFile(path).metadata.row_group(0).column(0).data_page_offset
    data[offset:offset + 16] = b"\xff" * 16
    open(path, "wb").write(data)
    with pytest.raises(OSError) as caught:
        pq.ParquetFile(path).read()
    os.unlink(path)
    assert error_kind(caught.value) == INPUT and not transient(caught.value)
    assert error_kind(OSError(errno.EIO, "Input/output error")) == IO  # the disk's, not the bytes'


def test_a_host_that_failed_for_the_whole_budget_fails_its_next_calls_after_one_try_until_one_succeeds():
    clock = FakeClock()
    retrying = Retrying(RetryPolicy(retry_for=10), clock.sleep, clock)
    tries = []

    def down():
        tries.append(1)
        raise TimeoutError("timed out")

    with pytest.raises(StorageUnavailable) as caught:
        retrying.call(down, "https://h/a.jpg", host="https://h")
    assert "rerun" not in str(caught.value) and str(caught.value).startswith("https://h: timed out")
    first = len(tries)
    with pytest.raises(StorageUnavailable):
        retrying.call(down, "https://h/b.jpg", host="https://h")
    assert len(tries) == first + 1  # one try, no second wait of the budget
    assert retrying.call(lambda: "ok", "https://h/c.jpg", host="https://h") == "ok"
    tries.clear()
    assert retrying.call(flaky([TimeoutError()]), "https://h/d.jpg", host="https://h") == "ok"  # a fresh budget
