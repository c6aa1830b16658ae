"""
A throwaway PostgreSQL for the test run, or the one named by ``MEDAGENT_PG_DSN``.

L{server_dsn} starts, once per test process and only when a test asks, a private cluster: a
temporary folder, C{initdb} (as ``nobody`` when the tests run as root: PostgreSQL refuses to
run as root), C{pg_ctl start} listening on 127.0.0.1 only, on a free port, with its socket in
that folder.  It is stopped and the folder removed when the process exits (C{atexit}: also
after failing tests); a cluster whose test process was killed is swept by the next run.
``MEDAGENT_PG_DSN`` (a role allowed to C{CREATE DATABASE}) reuses a running server instead.
Without PostgreSQL the tests skip, or fail in CI (``MEDAGENT_REQUIRE_PEERS=1``,
L{tests.peerenv.need}); ``.ci/peers-postgres.sh`` installs it.
"""

from __future__ import annotations

import atexit
import glob
import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import threading
from typing import Any

from tests.peerenv import need

#: What C{initdb} names the superuser of the throwaway cluster.
_USER = "medagent"


def binaries() -> str | None:
    """The newest PostgreSQL server bin folder (Debian: /usr/lib/postgresql/N/bin), or None."""
    found = [d for d in glob.glob("/usr/lib/postgresql/*/bin")
             if os.access(os.path.join(d, "initdb"), os.X_OK)
             and os.access(os.path.join(d, "pg_ctl"), os.X_OK)]
    if not found:
        on_path = shutil.which("initdb")
        return os.path.dirname(on_path) if on_path and shutil.which("pg_ctl") else None

    def version(d: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", d.split("/")[-2]))

    return max(found, key=version)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PREFIX = "medagent-pg-"
#: written into a cluster's folder: the test process that owns it
_OWNER = "owner.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_orphans(bindir: str) -> int:
    """
    Stop and remove the clusters of test processes that died without their C{atexit}
    (C{kill -9}, a CI timeout); a live owner's cluster is left alone.  How many.
    """
    swept = 0
    for folder in glob.glob(os.path.join(tempfile.gettempdir(), _PREFIX + "*")):
        try:
            with open(os.path.join(folder, _OWNER)) as f:
                owner = int(f.read().strip())
        except (OSError, ValueError):
            continue  # not one of ours, or still being set up
        if _alive(owner):
            continue
        orphan = Cluster.__new__(Cluster)
        orphan.bindir, orphan.folder = bindir, folder
        orphan.data = os.path.join(folder, "data")
        orphan._as = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        try:
            orphan.stop()
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
        swept += 1
    return swept


class Cluster:
    """A private PostgreSQL cluster in a temporary folder, loopback only."""

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.folder = tempfile.mkdtemp(prefix=_PREFIX)
        self.data = os.path.join(self.folder, "data")
        self.port = 0
        self._as: list[str] = []
        if os.geteuid() == 0:  # initdb and postgres refuse root: run them as nobody
            nobody = pwd.getpwnam("nobody")
            os.chown(self.folder, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]

    def _run(self, *argv: str, timeout: float = 120) -> None:
        result = subprocess.run([*self._as, *argv], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, timeout=timeout, cwd=self.folder)
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", "replace")[-2000:]
            raise RuntimeError(f"{os.path.basename(argv[0])} failed ({result.returncode}):"
                               f" {output}")

    def start(self) -> None:
        with open(os.path.join(self.folder, _OWNER), "w") as f:
            f.write(str(os.getpid()))
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", _USER,
                  "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync")
        last: Exception | None = None
        for _ in range(3):  # a free port can be taken between the probe and the start
            self.port = _free_port()
            try:
                self.start_server()
                return
            except RuntimeError as e:
                last = e
        raise RuntimeError(f"PostgreSQL did not start: {last}")

    def start_server(self) -> None:
        """C{pg_ctl start} on C{self.port} (again, after L{stop_server}: the same port)."""
        options = (f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.folder}"
                   " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
                   " -c max_connections=200")
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l",
                  os.path.join(self.folder, "server.log"), "-w", "-t", "60",
                  "-o", options, "start")

    def stop_server(self) -> None:
        """C{pg_ctl stop -m immediate}: the server goes as if it crashed; its data stays."""
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m", "immediate",
                  "-w", "-t", "30", "stop", timeout=60)

    def stop(self) -> None:
        try:
            if os.path.exists(os.path.join(self.data, "postmaster.pid")):
                self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-m",
                          "immediate", "-w", "-t", "30", "stop", timeout=60)
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{_USER}@127.0.0.1:{self.port}/{dbname}"


_lock = threading.Lock()
_cluster: Cluster | None = None
_external: str | None = os.environ.get("MEDAGENT_PG_DSN") or None


def server_dsn() -> str:
    """
    The DSN of a maintenance database on the test server: ``MEDAGENT_PG_DSN``, or the
    throwaway cluster (started on first use).  Skips/fails (L{need}) without PostgreSQL.
    """
    global _cluster
    if _external:
        return _external
    with _lock:
        if _cluster is None:
            bindir = binaries()
            need(bindir is not None, "PostgreSQL server (initdb, pg_ctl; apt install postgresql)")
            try:
                import psycopg  # noqa: F401
            except ImportError:
                need(False, "psycopg (pip install 'psycopg[binary]')")
            sweep_orphans(bindir)  # type: ignore[arg-type]
            cluster = Cluster(bindir)  # type: ignore[arg-type]
            atexit.register(cluster.stop)
            cluster.start()
            _cluster = cluster
        return _cluster.dsn()


def _with_dbname(dsn: str, dbname: str) -> str:
    """C{dsn} naming database C{dbname} (a URL stays a URL: the relay's option takes URLs)."""
    if dsn.startswith(("postgresql://", "postgres://")):
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(dsn)
        return urlunsplit(parts._replace(path="/" + dbname))
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    info: dict[str, Any] = conninfo_to_dict(dsn)
    info["dbname"] = dbname
    return make_conninfo(**info)


def fresh_database(name: str) -> str:
    """Drop and create database C{name} on the test server (blocking); its DSN."""
    import psycopg
    from psycopg import sql

    if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
        raise ValueError(f"not a plain database name: {name!r}")
    server = server_dsn()
    with psycopg.connect(server, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return _with_dbname(server, name)


def restartable() -> Cluster:
    """
    The private cluster, for tests that stop and start the server (L{Cluster.stop_server},
    L{Cluster.start_server}); a server named by ``MEDAGENT_PG_DSN`` is not ours to restart
    (skipped, or failed under ``MEDAGENT_REQUIRE_PEERS=1``).
    """
    need(_external is None, "a private PostgreSQL cluster (MEDAGENT_PG_DSN names a shared"
         " server, which the tests must not restart)")
    server_dsn()
    assert _cluster is not None
    return _cluster
