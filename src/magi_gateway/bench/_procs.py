"""Child processes of a benchmark and what /proc says about them.

Every child is started in its own session (a terminal's Ctrl-C reaches only the
benchmark, which then stops the children in order), writes stdout and stderr to a
log file, and is stopped by its PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import platform
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = [
    "BenchError",
    "Child",
    "Children",
    "all_cpu_us",
    "cpu_us",
    "host_cpu_ticks",
    "machine_info",
    "python_module",
    "raise_open_files_limit",
    "rss_kb",
    "wait_for",
    "wait_http_ok",
    "wait_tcp",
]

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STOP_GRACE_S = 10.0
_POLL_S = 0.05
_LOG_TAIL_BYTES = 2000
# Benchmarks talk to 127.0.0.1 only: never through a proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(RuntimeError):
    """A benchmark could not run (a child failed, a server never became ready)."""


def python_module(module: str, *args: str) -> list[str]:
    """Command line running ``python -m module args`` with this interpreter."""
    return [sys.executable, "-m", module, *args]


@dataclass
class Child:
    """One started child process."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process is still running."""
        return self.process.poll() is None

    def log_tail(self) -> str:
        """The end of the child's log, for error messages."""
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return ""
        return data[-_LOG_TAIL_BYTES:].decode(errors="replace")

    def check_alive(self) -> None:
        """Raise ``BenchError`` with the log's tail when the child has exited."""
        if not self.alive():
            raise BenchError(
                f"{self.name} (pid {self.pid}) exited with {self.process.returncode}; "
                f"log {self.log_path}:\n{self.log_tail()}"
            )


class Children:
    """The children of one benchmark run; all still running are stopped on exit."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self._children: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str]) -> Child:
        """Start ``args`` with ``env``, cwd the work dir, output to ``NAME.log``."""
        log_path = self.workdir / f"{name}.log"
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                list(args),
                cwd=self.workdir,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = Child(name, process, log_path)
        self._children.append(child)
        return child

    def stop(self, child: Child, grace_s: float = _STOP_GRACE_S) -> None:
        """SIGTERM ``child`` by PID, SIGKILL it if it is still there after ``grace_s``."""
        if child.alive():
            try:
                os.kill(child.pid, signal.SIGTERM)
                child.process.wait(grace_s)
            except subprocess.TimeoutExpired:
                os.kill(child.pid, signal.SIGKILL)
                child.process.wait()
            except ProcessLookupError:
                child.process.wait()
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Stop every child still running, the most recently started first."""
        for child in reversed(list(self._children)):
            self.stop(child)

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


# -- /proc -------------------------------------------------------------------------


def cpu_us(pid: int) -> int:
    """User + system CPU time of ``pid`` (all its threads), in microseconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name may contain spaces: fields are counted after its closing paren.
    fields = stat[stat.rindex(")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) * 1_000_000 // _CLOCK_TICKS


def all_cpu_us() -> dict[int, tuple[str, int]]:
    """``pid -> (command name, CPU µs)`` of every process on the host (best effort)."""
    found: dict[int, tuple[str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        found[int(entry.name)] = (name, (int(fields[11]) + int(fields[12])) * 1_000_000 // _CLOCK_TICKS)
    return found


def rss_kb(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (``VmRSS``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def host_cpu_ticks() -> tuple[int, int]:
    """Busy and total CPU ticks of the whole host, from /proc/stat."""
    first = Path("/proc/stat").read_text().splitlines()[0].split()
    values = [int(v) for v in first[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    # guest time is already counted in user time.
    total = sum(values[:8])
    return total - idle, total


def _meminfo_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, object]:
    """The host a benchmark ran on."""
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "mem_total_kb": _meminfo_kb("MemTotal"),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "kernel": platform.release(),
        "loadavg": list(os.getloadavg()),
    }


def raise_open_files_limit(needed: int) -> int:
    """Raise this process's soft RLIMIT_NOFILE (inherited by children) to the hard limit.

    Returns the new soft limit; a warning-worthy value when it is below ``needed``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    return soft


# -- waiting -----------------------------------------------------------------------


def wait_for(ready: Callable[[], bool], *, timeout_s: float, what: str, watch: Sequence[Child] = ()) -> None:
    """Poll ``ready`` until true; raise when ``timeout_s`` passes or a watched child exits."""
    deadline = time.monotonic() + timeout_s
    while True:
        for child in watch:
            child.check_alive()
        if ready():
            return
        if time.monotonic() > deadline:
            raise BenchError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(_POLL_S)


def wait_http_ok(url: str, *, timeout_s: float, watch: Sequence[Child] = ()) -> None:
    """Wait until ``GET url`` answers 200."""

    def ok() -> bool:
        try:
            with _DIRECT.open(url, timeout=1) as response:
                return int(response.status) == 200
        except (OSError, urllib.error.URLError):
            return False

    wait_for(ok, timeout_s=timeout_s, what=url, watch=watch)


def wait_tcp(port: int, *, timeout_s: float, watch: Sequence[Child] = ()) -> None:
    """Wait until 127.0.0.1:``port`` accepts a TCP connection."""

    def accepts() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        except OSError:
            return False

    wait_for(accepts, timeout_s=timeout_s, what=f"127.0.0.1:{port}", watch=watch)
