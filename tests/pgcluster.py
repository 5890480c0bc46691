"""A private PostgreSQL cluster on loopback for the test session.

The server refuses to run as root, so when the tests run as root the
cluster's files belong to the ``postgres`` OS user and every server command
runs through ``runuser``. The cluster trusts local connections, listens on
127.0.0.1 only and runs with fsync off, because its data is thrown away.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass


class ClusterUnavailable(RuntimeError):
    """No PostgreSQL server binaries were found on this machine."""


def find_bindir() -> str:
    explicit = os.environ.get("PG_BINDIR")
    candidates = [explicit] if explicit else []
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for path in candidates:
        if path and os.path.exists(os.path.join(path, "initdb")):
            return path
    on_path = shutil.which("initdb")
    if on_path:
        return os.path.dirname(on_path)
    raise ClusterUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the Debian package "
        "postgresql-15 or set PG_BINDIR"
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Cluster:
    bindir: str
    datadir: str
    port: int
    run_as: str | None

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"

    def _command(self, *args: str) -> list[str]:
        if self.run_as:
            return ["runuser", "-u", self.run_as, "--", *args]
        return list(args)

    def start(self) -> None:
        initdb = os.path.join(self.bindir, "initdb")
        subprocess.run(
            self._command(
                initdb,
                "-D",
                self.datadir,
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C.UTF-8",
            ),
            check=True,
            capture_output=True,
        )
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.datadir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
            "-c max_connections=200"
        )
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        subprocess.run(
            self._command(
                pg_ctl,
                "-D",
                self.datadir,
                "-o",
                options,
                "-w",
                "-t",
                "60",
                "-l",
                os.path.join(self.datadir, "server.log"),
                "start",
            ),
            check=True,
            capture_output=True,
        )

    def stop(self) -> None:
        pg_ctl = os.path.join(self.bindir, "pg_ctl")
        subprocess.run(
            self._command(pg_ctl, "-D", self.datadir, "-m", "immediate", "-w", "stop"),
            capture_output=True,
        )


def start_cluster() -> tuple[Cluster, str]:
    """Start a cluster; returns it and the temporary folder to delete after stop()."""
    bindir = find_bindir()
    root = tempfile.mkdtemp(prefix="sqlalchemy-encrypted-pg-")
    datadir = os.path.join(root, "data")
    run_as = None
    if os.geteuid() == 0:
        run_as = "postgres"
        entry = pwd.getpwnam(run_as)
        os.chmod(root, 0o755)
        os.makedirs(datadir, mode=0o700)
        os.chown(datadir, entry.pw_uid, entry.pw_gid)
    cluster = Cluster(bindir=bindir, datadir=datadir, port=_free_port(), run_as=run_as)
    cluster.start()
    return cluster, root
