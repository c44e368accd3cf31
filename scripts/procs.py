"""Child processes for ORP's tests and scripts: free ports, a clean environment, the mock
upstream and gunicorn started in sessions of their own, waiting for them, stopping them, and
what /proc says about them.

The scripts import it as `procs` (their folder is on sys.path when they run), the tests as
`scripts.procs`. Standard library only.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"  # loopback only, by design
START_TIMEOUT = 30.0
MOCK_UPSTREAM = ROOT / "scripts" / "mock_upstream.py"
GUNICORN_CONF = ("-c", "python:orp_proxy.ops.gunicorn_conf")  # the shipped configuration
GUNICORN_LISTENING = r"Listening at: (http://\S+)"
MOCK_LISTENING = r"listening on (http://\S+)"

# What would configure a child as ORP, gunicorn, Prometheus multiprocess mode or a systemd
# service, had the caller's shell or service manager set it.
_NOT_INHERITED = ("ORP_", "GUNICORN", "PROMETHEUS_", "WEB_CONCURRENCY", "RUNTIME_DIRECTORY",
                  "NOTIFY_SOCKET", "CREDENTIALS_DIRECTORY")

_T = TypeVar("_T")


def free_port(host: str = HOST) -> int:
    """A port nothing listens on now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def clean_env(home: Path | None = None, **settings: str) -> dict[str, str]:
    """This process's environment without `_NOT_INHERITED`, the checkout first on PYTHONPATH,
    HOME set to `home` when given (gunicorn >= 25.1 puts its control socket there), then
    `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_NOT_INHERITED)}
    if home is not None:
        env["HOME"] = str(home)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(settings)
    return env


def spawn(command: Sequence[str], *, cwd: Path, env: dict[str, str], stdout: Path,
          stderr: Path | None = None) -> subprocess.Popen[bytes]:
    """`command` in a session (so a process group) of its own, for `stop` to end with all it
    starts; output to log files, stderr into `stdout` unless given its own."""
    with contextlib.ExitStack() as files:
        out = files.enter_context(stdout.open("wb"))
        err = files.enter_context(stderr.open("wb")) if stderr is not None else subprocess.STDOUT
        return subprocess.Popen(list(command), stdout=out, stderr=err, env=env, cwd=cwd,
                                start_new_session=True)


def stop(process: subprocess.Popen[Any], grace: float = 15.0,
         sig: signal.Signals = signal.SIGTERM) -> None:
    """`sig` to the process group `process` leads (started in a session of its own); SIGKILL to
    the group after `grace` seconds, and in any case: that also ends workers a killed gunicorn
    master left behind."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(grace)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5)


@contextlib.contextmanager
def running(process: subprocess.Popen[Any], grace: float = 15.0,
            sig: signal.Signals = signal.SIGTERM) -> Iterator[subprocess.Popen[Any]]:
    """`process`, stopped when the block ends, also when waiting for it to start failed."""
    try:
        yield process
    finally:
        stop(process, grace, sig)


def wait_until(ready: Callable[[], _T | None], process: subprocess.Popen[Any], *, what: str,
               output: Callable[[], str], timeout: float = START_TIMEOUT,
               every: float = 0.05) -> _T:
    """Poll `ready` until it returns something other than None, and return that; an error
    naming `what`, with the end of `output()`, if `process` exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while True:
        found = ready()
        if found is not None:
            return found
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode} before "
                               f"{what}:\n{output()[-4000:]}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} within {timeout:g} s:\n{output()[-4000:]}")
        time.sleep(every)


def wait_for_lines(path: Path, pattern: str, process: subprocess.Popen[Any], *, count: int = 1,
                   timeout: float = START_TIMEOUT) -> list[re.Match[str]]:
    """The first `count` matches of `pattern` in the log at `path`, waiting for them (see
    `wait_until`)."""
    def log() -> str:
        return path.read_text(errors="replace") if path.exists() else ""

    def matches() -> list[re.Match[str]] | None:
        found = list(re.finditer(pattern, log()))
        return found[:count] if len(found) >= count else None

    return wait_until(matches, process, what=f"{pattern!r} in {path.name}", output=log,
                      timeout=timeout)


def wait_for_line(path: Path, pattern: str, process: subprocess.Popen[Any], *,
                  timeout: float = START_TIMEOUT) -> re.Match[str]:
    """The first match of `pattern` in the log at `path` (see `wait_until`)."""
    return wait_for_lines(path, pattern, process, timeout=timeout)[0]


def wait_port(port: int, process: subprocess.Popen[Any], *, host: str = HOST,
              timeout: float = START_TIMEOUT) -> None:
    """Until `host:port` accepts a connection (see `wait_until`; the output shown is the
    process's, if piped)."""
    def accepts() -> bool | None:
        with contextlib.suppress(OSError):
            socket.create_connection((host, port), timeout=0.2).close()
            return True
        return None

    def output() -> str:
        if process.poll() is None or process.stdout is None:
            return ""  # reading a running process's pipe would block
        text = process.stdout.read()
        return text.decode(errors="replace") if isinstance(text, bytes) else str(text)

    wait_until(accepts, process, what=f"listener on {host}:{port}", output=output,
               timeout=timeout)


@contextlib.contextmanager
def mock_upstream(home: Path, *options: str, timeout: float = START_TIMEOUT
                  ) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`scripts/mock_upstream.py --port 0 *options` as its own process (as in a deployment),
    logging to `home/mock.log`; yields its base URL (ending in /v1) and the process."""
    log = home / "mock.log"
    process = spawn([sys.executable, str(MOCK_UPSTREAM), "--port", "0", *options], cwd=home,
                    env=clean_env(home), stdout=log)
    with running(process):
        yield wait_for_line(log, MOCK_LISTENING, process, timeout=timeout).group(1), process


@contextlib.contextmanager
def gunicorn(home: Path, env: dict[str, str], *arguments: str, stdout: Path,
             stderr: Path | None = None, grace: float = 15.0
             ) -> Iterator[subprocess.Popen[bytes]]:
    """`python -m gunicorn *arguments` running in `home` (see `spawn`), stopped when the block
    ends; `grace` is how long its workers get to finish after SIGTERM."""
    process = spawn([sys.executable, "-m", "gunicorn", *arguments], cwd=home, env=env,
                    stdout=stdout, stderr=stderr)
    with running(process, grace):
        yield process


# -- /proc (Linux) ------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (which may hold spaces and
    parentheses): [1] is the parent's PID, [11] and [12] user and system CPU in ticks."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` (not its children), from the kernel's accounting."""
    fields = stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    """Resident memory of `pid` in KiB (0 where the kernel shows none)."""
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) if found else 0


def tcp_connections(remote_port: int) -> int:
    """Established TCP connections on this machine (IPv4 and IPv6) whose far end is
    `remote_port`: e.g. a gateway's connections to its upstream."""
    count = 0
    wanted = f":{remote_port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            next(lines, None)  # the header
            for line in lines:
                fields = line.split()
                if len(fields) > 3 and fields[3] == "01" and fields[2].endswith(wanted):
                    count += 1
    return count


def children(pid: int) -> list[int]:
    """PIDs whose parent is `pid` (gunicorn's workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):  # gone while we looked
                if int(stat_fields(int(entry))[1]) == pid:
                    found.append(int(entry))
    return sorted(found)


def tree(pid: int) -> list[int]:
    """`pid` and all its descendants (a gateway started through a shell, or with workers)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                parents[int(entry)] = int(stat_fields(int(entry))[1])
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        found += frontier
    return found


def tree_cpu_seconds(pids: Sequence[int]) -> float:
    """CPU seconds of `pids` together; a process gone meanwhile counts as 0."""
    total = 0.0
    for pid in pids:
        with contextlib.suppress(OSError):
            total += cpu_seconds(pid)
    return total


@contextlib.contextmanager
def affinity(cpus: Sequence[int] | None) -> Iterator[None]:
    """Processes started inside the block run on `cpus` (children inherit the starting thread's
    CPU mask, and their threads and children inherit theirs); None changes nothing."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def pin_tree(pid: int, cpus: Sequence[int]) -> list[int]:
    """Every thread of `pid` and of its descendants onto `cpus` (a process started elsewhere);
    the PIDs pinned."""
    pinned = tree(pid)
    for each in pinned:
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{each}/task"):
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(int(task), cpus)
    return pinned
