"""Real services on 127.0.0.1 for fault tests and the fault drill, started and stopped by pid: a Ray worker
found by its process title, to kill -9.

Ray names each actor's worker process ``ray::<Class>`` while idle and ``ray::<Class>.<method>`` while it runs
a task (Ray Data's actors: ``ray::MapWorker(MapBatches(<Class>))``), so a busy actor is found without a hook
in the code under test.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path


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
