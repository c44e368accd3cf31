"""A throwaway PostgreSQL server: an unprivileged cluster in a temporary directory.

Started from Debian's `postgresql` package binaries (/usr/lib/postgresql/*/bin, else `initdb`
on PATH), listening on 127.0.0.1 and a free port (its Unix socket in its own directory), and
removed at the end; a watchdog process stops and removes it if the process that started it dies
without cleaning up. The server refuses to run as root, so as root the cluster belongs to the
`postgres` user. Data durability is traded for speed (`fsync = off`): nothing in it is kept.

The test-suite uses it through tests/pg.py; scripts/bench (`--postgres`) for its store section.
The scripts import it as `pgcluster` (their folder is on sys.path when they run), the tests as
`scripts.pgcluster`. Standard library only.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

try:
    import procs  # run from a script: its folder is on sys.path
except ImportError:  # imported as scripts.pgcluster
    from scripts import procs

SUPERUSER = "orp"
# A role that must log in with a password (scram-sha-256), for the password-file tests.
PASSWORD_USER = "orp_pw"
PASSWORD = "pw-0123456789-sekrit"


def find_bindir() -> str | None:
    """The directory of `initdb` and `pg_ctl`: Debian's versioned one, else from PATH."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                        key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0)
    for directory in reversed(candidates):
        if os.access(os.path.join(directory, "initdb"), os.X_OK):
            return directory
    found = shutil.which("initdb")
    return os.path.dirname(found) if found else None


@dataclass
class Cluster:
    """One running PostgreSQL server (`postgres` owns it when started as root)."""

    bindir: str
    directory: Path
    port: int
    _names: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def _run(self, *command: str, check: bool = True, timeout: float = 60
             ) -> subprocess.CompletedProcess[str]:
        argv = list(command)
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                env=procs.clean_env(), cwd=self.directory)
        if check and result.returncode != 0:
            raise RuntimeError(f"{command[0]} failed ({result.returncode}): "
                               f"{result.stdout}{result.stderr}\n{self.server_log()[-3000:]}")
        return result

    def server_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def init(self) -> None:
        self._run(f"{self.bindir}/initdb", "-D", str(self.data), "-U", SUPERUSER,
                  "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
        (self.data / "pg_hba.conf").write_text(
            f"local all all trust\n"
            f"host all {PASSWORD_USER} 127.0.0.1/32 scram-sha-256\n"
            f"host all all 127.0.0.1/32 trust\n")
        with (self.data / "postgresql.conf").open("a") as conf:
            # Throwaway data: durability against an OS crash is not what it is for (a clean
            # or fast shutdown still writes everything).
            conf.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                       f"unix_socket_directories = '{self.directory}'\n"
                       "fsync = off\nfull_page_writes = off\nmax_connections = 200\n")

    def start(self) -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                  "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run(f"{self.bindir}/pg_ctl", "-D", str(self.data), "-m", mode, "-w", "stop",
                  check=False)

    def postmaster_pid(self) -> int:
        """The running server's main process (the first line of `postmaster.pid`)."""
        return int((self.data / "postmaster.pid").read_text().split("\n", 1)[0])

    def psql(self, sql: str, database: str = "postgres") -> str:
        return self._run(f"{self.bindir}/psql", "-h", "127.0.0.1", "-p", str(self.port), "-U",
                         SUPERUSER, "-d", database, "-v", "ON_ERROR_STOP=1", "-Atqc",
                         sql).stdout

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        name = f"orp_test_{os.getpid()}_{next(self._names)}"
        self.psql(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        with contextlib.suppress(RuntimeError):
            self.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


# Stops the server and removes its directory once the process that started it is gone, however
# it went (a killed pytest or bench runs no clean-up, and a server left running would outlive
# it).
_WATCHDOG = """
import os, shutil, subprocess, sys, time
pid, directory, *stop = sys.argv[1:]
while os.path.isdir(directory):
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        subprocess.run(stop, capture_output=True, timeout=60)
        shutil.rmtree(directory, ignore_errors=True)
        break
    time.sleep(1)
"""


@contextlib.contextmanager
def running_cluster(bindir: str) -> Iterator[Cluster]:
    """A new cluster, started; stopped and its directory removed when the block ends."""
    directory = Path(tempfile.mkdtemp(prefix="orp-pg-"))
    if os.geteuid() == 0:
        owner = pwd.getpwnam("postgres")
        os.chown(directory, owner.pw_uid, owner.pw_gid)
    cluster = Cluster(bindir, directory, procs.free_port())
    stop = [f"{bindir}/pg_ctl", "-D", str(cluster.data), "-m", "immediate", "-w", "stop"]
    if os.geteuid() == 0:
        stop = ["runuser", "-u", "postgres", "--", *stop]
    watchdog = subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(os.getpid()),
                                 str(directory), *stop], start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        cluster.init()
        cluster.start()
        cluster.psql(f"CREATE ROLE {PASSWORD_USER} LOGIN PASSWORD '{PASSWORD}'")
        yield cluster
    finally:
        cluster.stop("immediate")
        shutil.rmtree(directory, ignore_errors=True)
        watchdog.terminate()
        watchdog.wait(10)
